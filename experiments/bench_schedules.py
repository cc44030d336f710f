"""Side by side in one run: the fixed schedules on SmolLM2 (float32), context 512, KV on disk.

Each schedule runs the main job (`stagejax.experiment.run_experiment`) in a fresh process, so
its memory figures are its own: a ~480-token prompt from WikiText-2 (validation split) is
prefilled, then `--new-tokens` decode steps are timed (the context ends near 512), then 2 chunks
of perplexity through the schedule's own path. In the same run, the memory read bandwidth is
measured, giving `model`'s floor: weight bytes per token / bandwidth.

    .venv/bin/python experiments/bench_schedules.py            # writes experiments/results/
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("atomic", "op", "layer", "model")


def settings_for(policy: str, args):
    from stagejax import data
    from stagejax.settings import (CacheSettings, DecodeSettings, EvalSettings, ModelSettings,
                                   RunSettings, ScheduleSettings, StoreSettings, TrackingSettings)

    # Calibration/validation text for the prompt (the test split is for perplexity only).
    text = data.read_text("wikitext-2/wiki.valid.tokens")
    return RunSettings(
        model=ModelSettings("smollm2_135m"),
        schedule=ScheduleSettings(policy=policy, ffn_chunks=args.ffn_chunks,
                                  vocab_chunk=args.vocab_chunk, kv_block=args.kv_block,
                                  prefetch_depth=args.prefetch_depth, prefill_block=64),
        cache=CacheSettings(kind="disk"),
        store=StoreSettings(verify="open"),
        eval=EvalSettings(ppl_chunks=args.ppl_chunks, n_ctx=512),
        decode=DecodeSettings(prompt=text[:args.prompt_chars], max_new_tokens=args.new_tokens),
        tracking=TrackingSettings(mode="disabled"))


def run_one(policy: str, out_dir: Path, args) -> None:
    from stagejax.experiment import run_experiment

    run_experiment(settings_for(policy, args), out_dir, progress=False)


def memory_read_gbps(n_bytes: int = 1 << 29, repeats: int = 7) -> float:
    """Median read bandwidth of a jitted sum over a float32 array of `n_bytes` (XLA, all cores)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return n_bytes / float(np.median(times)) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--ffn-chunks", type=int, default=8)
    parser.add_argument("--vocab-chunk", type=int, default=512)
    parser.add_argument("--kv-block", type=int, default=512)
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=1820)  # ~480 SmolLM2 tokens
    parser.add_argument("--ppl-chunks", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "schedules_smollm2"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one policy in this process
    args = parser.parse_args()
    out = Path(args.out)
    if args.one:
        run_one(args.one, out / args.one, args)
        return

    forwarded = [f"--ffn-chunks={args.ffn_chunks}", f"--vocab-chunk={args.vocab_chunk}",
                 f"--kv-block={args.kv_block}", f"--prefetch-depth={args.prefetch_depth}",
                 f"--new-tokens={args.new_tokens}", f"--prompt-chars={args.prompt_chars}",
                 f"--ppl-chunks={args.ppl_chunks}", f"--out={out}"]
    rows = []
    for policy in args.policies.split(","):
        print(f"running {policy} ...", flush=True)
        subprocess.run([sys.executable, __file__, f"--one={policy}", *forwarded], check=True)
        rows.append(json.loads((out / policy / "metrics.json").read_text()))
    bandwidth = memory_read_gbps()

    from stagejax.results import atomic_write_json, atomic_write_text

    by = {r["schedule"]: r for r in rows}
    lines = [
        f"SmolLM2-135M float32, context {rows[0]['prompt_tokens']}+{args.new_tokens} tokens, KV on disk "
        f"(kv_block {args.kv_block}), ffn_chunks {args.ffn_chunks}, vocab_chunk {args.vocab_chunk}, "
        f"prefetch depth {args.prefetch_depth}; warm page cache; memory read bandwidth "
        f"{bandwidth:.1f} GB/s (jitted sum, same run)", "",
        "| schedule | stages | groups | planned peak MB | decode peak MB | tokens/s | io_wait | "
        "MB streamed/token | PPL (2 chunks) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['schedule']} | {r['n_stages']} | {r['n_groups']} | {r['planned_peak_bytes'] / 2**20:.1f} | "
            f"{r['peak_rss_decode_bytes'] / 2**20:.1f} | {r['decode_tokens_per_s']:.2f} | "
            f"{r['io_wait_frac']:.2f} | {r['bytes_streamed_per_token'] / 2**20:.1f} | "
            f"{r.get('ppl', float('nan')):.4f} |")
    summary = {"memory_read_gbps": bandwidth, "runs": rows}
    if "model" in by:
        weight_bytes = by["model"]["weight_bytes"]  # every weight is read once per decode step
        floor_s = weight_bytes / (bandwidth * 1e9)
        model_s = 1 / by["model"]["decode_tokens_per_s"]
        summary["model_floor_s"] = floor_s
        lines += ["", f"model: {model_s * 1e3:.1f} ms/token vs memory-bandwidth floor "
                      f"{floor_s * 1e3:.1f} ms ({weight_bytes / 2**20:.0f} MB / {bandwidth:.1f} GB/s): "
                      f"{model_s / floor_s:.2f}x the floor"]
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
