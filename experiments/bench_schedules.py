"""Side by side in one run: the fixed schedules on SmolLM2 (float32), context 512, KV on disk.

Each schedule runs the main job (`stagejax.experiment.run_experiment`) in a fresh process, so
its memory figures are its own: a ~480-token prompt from WikiText-2 (validation split) is
prefilled, then `--new-tokens` decode steps are timed (the context ends near 512), then 2 chunks
of perplexity through the schedule's own path. In the same run, the memory read bandwidth is
measured two ways, giving `model`'s floor (weight bytes per token / bandwidth): one thread
reducing pre-touched memory, and a jitted sum using every core as `model`'s matvecs do (its
step runs XLA's threads on both cores). The floor is stated against the higher, all-core rate.

    .venv/bin/python experiments/bench_schedules.py            # writes experiments/results/
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, run_isolated, smollm2_settings  # noqa: E402

POLICIES = ("atomic", "op", "layer", "model")


def memory_read_bandwidth() -> tuple[float, float]:
    """(one-thread, all-core) memory read bandwidth in bytes/s: one thread reducing 512 MiB of
    distinct, pre-touched memory, timed by thread CPU time, median of 9
    (`stagejax.calibration.measure_memory_read_bandwidth`); and `jax.jit(jnp.sum)` over 512 MiB,
    which XLA spreads over every core, wall clock, median of 7 (`xla_sum_probe`)."""
    from stagejax.calibration import measure_memory_read_bandwidth, xla_sum_probe

    return measure_memory_read_bandwidth()[0], xla_sum_probe().value


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--ffn-chunks", type=int, default=8)
    parser.add_argument("--vocab-chunk", type=int, default=512)
    parser.add_argument("--kv-block", type=int, default=512)
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ppl-chunks", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "schedules_smollm2"))
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    bandwidths = []
    for policy in args.policies.split(","):
        print(f"running {policy} ...", flush=True)
        bandwidths.append(memory_read_bandwidth())  # interleaved with the runs it bounds
        settings = smollm2_settings(policy, new_tokens=args.new_tokens, ppl_chunks=args.ppl_chunks,
                                    schedule=dict(ffn_chunks=args.ffn_chunks, vocab_chunk=args.vocab_chunk,
                                                  kv_block=args.kv_block, prefetch_depth=args.prefetch_depth))
        metrics = run_isolated(settings, out / policy)
        if "error" in metrics:
            raise SystemExit(f"{policy} failed: {metrics['error']}")
        rows.append(metrics)
    bandwidths.append(memory_read_bandwidth())
    one_thread = [b[0] for b in bandwidths]
    all_cores = [b[1] for b in bandwidths]
    median = lambda values: float(sorted(values)[len(values) // 2]) / 1e9
    bandwidth_1t, bandwidth = median(one_thread), median(all_cores)

    from stagejax.results import atomic_write_json, atomic_write_text

    by = {r["schedule"]: r for r in rows}
    lines = [
        f"SmolLM2-135M float32, context {rows[0]['prompt_tokens']}+{args.new_tokens} tokens, KV on disk "
        f"(kv_block {args.kv_block}), ffn_chunks {args.ffn_chunks}, vocab_chunk {args.vocab_chunk}, "
        f"prefetch depth {args.prefetch_depth}; warm page cache; memory read bandwidth "
        f"{bandwidth:.1f} GB/s on all cores (jitted sum of 512 MiB; probes interleaved with the "
        f"runs: {', '.join(f'{b / 1e9:.1f}' for b in all_cores)}), {bandwidth_1t:.1f} GB/s on one "
        f"thread ({', '.join(f'{b / 1e9:.1f}' for b in one_thread)})", "",
        "| schedule | stages | groups | planned peak MB | decode peak MB | tokens/s | io_wait | "
        "MB streamed/token | PPL (2 chunks) | predicted ms/step | measured ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {r['n_stages']} | {r['n_groups']} | {r['planned_peak_bytes'] / 2**20:.1f} | "
            f"{r['peak_rss_decode_bytes'] / 2**20:.1f} | {r['decode_tokens_per_s']:.2f} | "
            f"{r['io_wait_frac']:.2f} | {r['bytes_streamed_per_token'] / 2**20:.1f} | "
            f"{r.get('ppl', float('nan')):.4f} | {r.get('predicted_step_s', float('nan')) * 1e3:.1f} | "
            f"{1e3 / r['decode_tokens_per_s']:.1f} |")
    summary = {"memory_read_gbps": bandwidth, "memory_read_probes_gbps": [b / 1e9 for b in all_cores],
               "memory_read_one_thread_gbps": bandwidth_1t,
               "memory_read_one_thread_probes_gbps": [b / 1e9 for b in one_thread], "runs": rows}
    if "model" in by:
        weight_bytes = by["model"]["weight_bytes"]  # every weight is read once per decode step
        floor_s = weight_bytes / (bandwidth * 1e9)
        model_s = 1 / by["model"]["decode_tokens_per_s"]
        floor_1t_s = weight_bytes / (bandwidth_1t * 1e9)
        summary["model_floor_s"] = floor_s
        summary["model_floor_one_thread_s"] = floor_1t_s
        lines += ["", f"model: {model_s * 1e3:.1f} ms/token vs memory-bandwidth floor "
                      f"{floor_s * 1e3:.1f} ms ({weight_bytes / 2**20:.0f} MB / {bandwidth:.1f} GB/s, "
                      f"all cores): {model_s / floor_s:.2f}x the floor (against the one-thread rate, "
                      f"{bandwidth_1t:.1f} GB/s: floor {floor_1t_s * 1e3:.1f} ms, {model_s / floor_1t_s:.2f}x)"]
        for policy in ("atomic", "op", "layer"):
            if policy in by:
                r = by[policy]
                lines.append(
                    f"{policy}: decode peak {by['model']['peak_rss_decode_bytes'] / max(r['peak_rss_decode_bytes'], 1):.0f}x "
                    f"below model's; tokens/s {r['decode_tokens_per_s'] / by['model']['decode_tokens_per_s']:.2f}x model's")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", table + "\n")


if __name__ == "__main__":
    main()
