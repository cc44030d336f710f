"""Side by side in one run: the fixed schedules on SmolLM2 (float32), context 512, KV on disk.

Each schedule runs the main job (`stagejax.experiment.run_experiment`) in a fresh process, so
its memory figures are its own: a ~480-token prompt from WikiText-2 (validation split) is
prefilled, then `--new-tokens` decode steps are timed (the context ends near 512), then 2 chunks
of perplexity through the schedule's own path. In the same run, the memory read bandwidth is
measured two ways, giving `model`'s floor (weight bytes per token / bandwidth): one thread
reducing pre-touched memory, and a jitted sum using every core as `model`'s matvecs do (its
step runs XLA's threads on both cores). The floor is stated against the higher, all-core rate.
A third probe times what XLA itself reaches on `model`'s work: a jit of the model's own chain of
projection matvecs (its shapes, random resident float32 weights, each output feeding the next
input, no attention, norms or RoPE), so the floor's gap is split into XLA's matvecs and the rest.

This VM's timings drift by tens of percent over minutes, so the schedules run in `--rounds`
interleaved rounds (atomic, op, layer, model, atomic, ...): tokens/s ratios are taken within a
round and their median reported, with every round's figures listed. Perplexity is computed in
the first round only (it is deterministic).

    .venv/bin/python experiments/bench_schedules.py            # writes experiments/results/

`--against REV` times this tree against a git worktree of revision REV instead, in one
invocation: each round runs every schedule on both trees, alternating which goes first, and
reports per schedule the tokens/s ratio (this tree / REV) within each round — the check that a
refactoring slowed nothing down beyond run-to-run spread.

    .venv/bin/python experiments/bench_schedules.py --against 3884b4f --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

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


def matvec_chain_seconds(repeats: int = 21) -> tuple[float, int]:
    """(median seconds, weight bytes) of one jitted call running SmolLM2's decode projections
    as a dependent chain: per layer q, k, v, o, gate, up, down, then the LM head; weights
    resident, float32, random. What XLA's matvecs alone cost for `model`'s weight bytes."""
    import time

    import jax
    import jax.numpy as jnp

    from stagejax.loading import open_model

    config = open_model("smollm2_135m").config
    d, h = config.d_model, config.head_dim
    shapes = [(d, config.n_heads * h), (d, config.n_kv_heads * h), (d, config.n_kv_heads * h),
              (config.n_heads * h, d), (d, config.ffn_dim), (d, config.ffn_dim), (config.ffn_dim, d)]
    rng = np.random.default_rng(0)
    weights = [[jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02) for shape in shapes]
               for _ in range(config.n_layers)]
    head = jnp.asarray(rng.standard_normal((d, config.vocab_size), dtype=np.float32) * 0.02)

    def fold(x, y):  # the next input depends on this output (a decode step's data flow)
        return x + jnp.resize(y, x.shape) * 1e-3

    @jax.jit
    def chain(x, weights, head):
        for q, k, v, o, gate, up, down in weights:
            x = fold(x, x @ q)
            x = fold(x, x @ k + (x @ v).sum())
            x = fold(x, jnp.resize(x, (1, q.shape[1])) @ o)
            x = fold(x, (jax.nn.silu(x @ gate) * (x @ up)) @ down)
        return x @ head

    x = jnp.ones((1, d), jnp.float32)
    chain(x, weights, head).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        chain(x, weights, head).block_until_ready()
        times.append(time.perf_counter() - start)
    nbytes = sum(w.nbytes for layer in weights for w in layer) + head.nbytes
    return float(np.median(times)), nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--ffn-chunks", type=int, default=8)
    parser.add_argument("--vocab-chunk", type=int, default=512)
    parser.add_argument("--kv-block", type=int, default=512)
    parser.add_argument("--prefetch-depth", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ppl-chunks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "schedules_smollm2"))
    parser.add_argument("--against", default=None, metavar="REV",
                        help="time this tree against a git worktree of REV (see the docstring)")
    parser.add_argument("--resummarize", action="store_true",
                        help="rewrite summary.md from the out directory's summary.json, running nothing")
    args = parser.parse_args()
    out = Path(args.out)
    policies = args.policies.split(",")
    if args.against:
        compare_revisions(args, policies)
        return
    if args.resummarize:
        import json

        saved = json.loads((out / "summary.json").read_text())
        by_policy = {row["schedule"]: row["runs"] for row in saved["schedules"]}
        policies = list(by_policy)
        rounds = [{p: by_policy[p][r] for p in policies} for r in range(saved["rounds"])]
        args.rounds = saved["rounds"]
        write_summary(args, out, policies, rounds, saved["memory_read_one_thread_probes_gbps"],
                      saved["memory_read_probes_gbps"], saved["matvec_chain_s"],
                      saved["matvec_chain_bytes"], scale=1e9)
        return
    rounds: list[dict] = []
    bandwidths = []
    for r in range(args.rounds):
        runs = {}
        for policy in policies:
            print(f"round {r + 1}/{args.rounds}: {policy} ...", flush=True)
            bandwidths.append(memory_read_bandwidth())  # interleaved with the runs it bounds
            settings = smollm2_settings(
                policy, new_tokens=args.new_tokens, ppl_chunks=args.ppl_chunks if r == 0 else 0,
                schedule=dict(ffn_chunks=args.ffn_chunks, vocab_chunk=args.vocab_chunk,
                              kv_block=args.kv_block, prefetch_depth=args.prefetch_depth))
            metrics = run_isolated(settings, out / policy / f"round{r + 1}")
            if "error" in metrics:
                raise SystemExit(f"{policy} failed: {metrics['error']}")
            runs[policy] = metrics
        rounds.append(runs)
    bandwidths.append(memory_read_bandwidth())
    chain_s, chain_bytes = matvec_chain_seconds()
    write_summary(args, out, policies, rounds, [b[0] for b in bandwidths],
                  [b[1] for b in bandwidths], chain_s, chain_bytes)


def compare_revisions(args, policies: list[str]) -> None:
    """Every schedule on this tree and on a worktree of `args.against`, interleaved; writes
    summary.md and summary.json into --out (default: results/schedules_vs_<rev>)."""
    import json
    import subprocess
    import tempfile

    from stagejax_device.results import atomic_write_json, atomic_write_text

    rev = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
    this = here + ("+changes" if dirty else "")
    out = Path(args.out) if args.out != str(REPO / "experiments" / "results" / "schedules_smollm2") \
        else REPO / "experiments" / "results" / f"schedules_vs_{rev}"
    records = []
    with tempfile.TemporaryDirectory(prefix="stagejax-rev-") as scratch:
        tree = Path(scratch) / rev
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for r in range(args.rounds):
                for i, policy in enumerate(policies):
                    order = [(this, None), (rev, tree)]
                    if (r + i) % 2:
                        order.reverse()
                    for label, where in order:
                        print(f"round {r + 1}/{args.rounds}: {policy} on {label} ...", flush=True)
                        settings = smollm2_settings(
                            policy, new_tokens=args.new_tokens, ppl_chunks=0,
                            schedule=dict(ffn_chunks=args.ffn_chunks, vocab_chunk=args.vocab_chunk,
                                          kv_block=args.kv_block, prefetch_depth=args.prefetch_depth))
                        run_dir = Path(scratch) / "runs" / f"{policy}-{label}-round{r + 1}"
                        metrics = run_isolated(settings, run_dir, where)
                        if "error" in metrics:
                            raise SystemExit(f"{policy} on {label} failed: {metrics['error']}")
                        records.append({"round": r + 1, "schedule": policy, "tree": label,
                                        **{k: metrics.get(k) for k in (
                                            "decode_tokens_per_s", "prefill_tokens_per_s",
                                            "compile_s", "decode_peak_rss_bytes",
                                            "baseline_rss_bytes", "decode_working_set_bytes",
                                            "planned_peak_bytes", "generated_ids")}})
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO,
                           capture_output=True)
    median = lambda values: float(np.median(values))
    listed = lambda values: " / ".join(f"{v:.3f}" for v in values)
    lines = [f"SmolLM2-135M float32, {args.new_tokens} decode steps after a ~480-token prompt, KV on "
             f"disk, ffn_chunks {args.ffn_chunks}, vocab_chunk {args.vocab_chunk}, prefetch depth "
             f"{args.prefetch_depth}: this tree ({this}) against {rev}, {args.rounds} rounds, each "
             f"run a fresh process, the two trees alternating which runs first. Ratios are this "
             f"tree's over {rev}'s within a round (median, then every round's).", "",
             "| schedule | decode tok/s ratio | prefill tok/s ratio | compile s ratio | "
             "decode peak RSS MB (this / rev) | same tokens |", "|---|---|---|---|---|---|"]
    summary = {"this": this, "rev": rev, "rounds": args.rounds, "runs": records, "schedules": {}}
    for policy in policies:
        ratios = {}
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "compile_s"):
            ratios[key] = [next(x[key] for x in records if x["round"] == r and x["schedule"] == policy
                                and x["tree"] == this)
                           / next(x[key] for x in records if x["round"] == r and x["schedule"] == policy
                                  and x["tree"] == rev) for r in range(1, args.rounds + 1)]
        rss = {label: median([x["decode_peak_rss_bytes"] / 2**20 for x in records
                              if x["schedule"] == policy and x["tree"] == label]) for label in (this, rev)}
        same = len({json.dumps(x["generated_ids"]) for x in records if x["schedule"] == policy}) == 1
        summary["schedules"][policy] = {"ratios": ratios, "decode_peak_rss_mb": rss, "same_tokens": same}
        lines.append(f"| {policy} | {median(ratios['decode_tokens_per_s']):.3f} "
                     f"({listed(ratios['decode_tokens_per_s'])}) | "
                     f"{median(ratios['prefill_tokens_per_s']):.3f} ({listed(ratios['prefill_tokens_per_s'])}) | "
                     f"{median(ratios['compile_s']):.3f} ({listed(ratios['compile_s'])}) | "
                     f"{rss[this]:.1f} / {rss[rev]:.1f} | {'yes' if same else 'NO'} |")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", table + "\n")


def write_summary(args, out: Path, policies: list[str], rounds: list[dict], one_thread: list[float],
                  all_cores: list[float], chain_s: float, chain_bytes: int, scale: float = 1.0) -> None:
    """summary.md and summary.json from the rounds' metrics and the probes (bytes/s; `scale`
    converts probes saved in GB/s)."""
    one_thread = [b * scale for b in one_thread]
    all_cores = [b * scale for b in all_cores]
    median = lambda values: float(np.median(values))
    bandwidth_1t, bandwidth = median(one_thread) / 1e9, median(all_cores) / 1e9

    from stagejax_device.results import atomic_write_json, atomic_write_text

    ms = lambda r: 1e3 / r["decode_tokens_per_s"]
    listed = lambda values, fmt: " / ".join(fmt.format(v) for v in values)
    lines = [
        f"SmolLM2-135M float32, context {rounds[0][policies[0]]['prompt_tokens']}+{args.new_tokens} "
        f"tokens, KV on disk (kv_block {args.kv_block}), ffn_chunks {args.ffn_chunks}, vocab_chunk "
        f"{args.vocab_chunk}, prefetch depth {args.prefetch_depth}; warm page cache; {args.rounds} "
        f"interleaved rounds, each run a fresh process (median, then every round's value); memory "
        f"read bandwidth {bandwidth:.1f} GB/s on all cores (jitted sum of 512 MiB; probes "
        f"interleaved with the runs: {', '.join(f'{b / 1e9:.1f}' for b in all_cores)}), "
        f"{bandwidth_1t:.1f} GB/s on one thread ({', '.join(f'{b / 1e9:.1f}' for b in one_thread)})",
        "",
        "Whole process: the peak RSS while decoding, and the runtime baseline (RSS after the "
        "schedule's warm-up, before its weights); working set: the decode's peak above that "
        "baseline, beside the plan's prediction. MB = 2^20 bytes. The first round also scores "
        "perplexity; each run's whole-run peak (`peak_rss_bytes`, that phase included) is in "
        "summary.json" + (f" (`model`'s first round: {rounds[0]['model']['peak_rss_bytes'] / 2**20:.1f} MB)"
                          if "model" in rounds[0] else "") + ".", "",
        "| schedule | stages | groups | whole process while decoding MB | runtime baseline MB | planned peak MB | "
        "working set MB (above the baseline) | tokens/s | io_wait | "
        "MB streamed/token | PPL (2 chunks) | predicted ms/step | measured ms/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    summary_rows = []
    for policy in policies:
        runs = [rnd[policy] for rnd in rounds]
        first = runs[0]
        tps = [r["decode_tokens_per_s"] for r in runs]
        peaks = [r["decode_working_set_bytes"] / 2**20 for r in runs]
        whole = [r["decode_peak_rss_bytes"] / 2**20 for r in runs]
        baselines = [r["baseline_rss_bytes"] / 2**20 for r in runs]
        lines.append(
            f"| {policy} | {first['n_stages']} | {first['n_groups']} | "
            f"{median(whole):.1f} ({listed(whole, '{:.1f}')}) | "
            f"{median(baselines):.1f} ({listed(baselines, '{:.1f}')}) | "
            f"{first['planned_peak_bytes'] / 2**20:.1f} | {median(peaks):.1f} ({listed(peaks, '{:.1f}')}) | "
            f"{median(tps):.2f} ({listed(tps, '{:.2f}')}) | "
            f"{median([r['io_wait_frac'] for r in runs]):.2f} | "
            f"{median([r['bytes_streamed_per_token'] for r in runs]) / 2**20:.1f} | "
            f"{first.get('ppl', float('nan')):.4f} | "
            f"{median([r.get('predicted_step_s', float('nan')) for r in runs]) * 1e3:.1f} | "
            f"{median([ms(r) for r in runs]):.1f} ({listed([ms(r) for r in runs], '{:.1f}')}) |")
        summary_rows.append({"schedule": policy, "runs": runs})
    summary = {"memory_read_gbps": bandwidth, "memory_read_probes_gbps": [b / 1e9 for b in all_cores],
               "memory_read_one_thread_gbps": bandwidth_1t,
               "memory_read_one_thread_probes_gbps": [b / 1e9 for b in one_thread],
               "matvec_chain_s": chain_s, "matvec_chain_bytes": chain_bytes,
               "rounds": args.rounds, "schedules": summary_rows}
    if "model" in policies:
        weight_bytes = rounds[0]["model"]["weight_bytes"]  # every weight is read once per decode step
        floor_s = weight_bytes / (bandwidth * 1e9)
        floor_1t_s = weight_bytes / (bandwidth_1t * 1e9)
        model_s = [1 / rnd["model"]["decode_tokens_per_s"] for rnd in rounds]
        summary.update(model_floor_s=floor_s, model_floor_one_thread_s=floor_1t_s)
        lines += ["", f"model: {median(model_s) * 1e3:.1f} ms/token ({listed([m * 1e3 for m in model_s], '{:.1f}')}) "
                      f"vs memory-bandwidth floor {floor_s * 1e3:.1f} ms ({weight_bytes / 2**20:.0f} MB / "
                      f"{bandwidth:.1f} GB/s, all cores): {median(model_s) / floor_s:.2f}x the floor "
                      f"(against the one-thread rate, {bandwidth_1t:.1f} GB/s: floor {floor_1t_s * 1e3:.1f} ms, "
                      f"{median(model_s) / floor_1t_s:.2f}x)",
                  f"XLA matvec chain of the same projections ({chain_bytes / 2**20:.0f} MB, weights "
                  f"resident, no attention/norms): {chain_s * 1e3:.1f} ms = {chain_s / (chain_bytes / (bandwidth * 1e9)):.2f}x "
                  f"its all-core floor; model's step is {median(model_s) / chain_s:.2f}x the chain"]
        for policy in ("atomic", "op", "layer"):
            if policy in policies:
                speed = [rnd[policy]["decode_tokens_per_s"] / rnd["model"]["decode_tokens_per_s"] for rnd in rounds]
                memory = [rnd["model"]["decode_working_set_bytes"] / max(rnd[policy]["decode_working_set_bytes"], 1)
                          for rnd in rounds]
                whole = [rnd["model"]["decode_peak_rss_bytes"] / rnd[policy]["decode_peak_rss_bytes"]
                         for rnd in rounds]
                summary[f"{policy}_whole_process_below_model"] = whole
                summary[f"{policy}_speed_vs_model"] = speed
                summary[f"{policy}_peak_below_model"] = memory
                lines.append(
                    f"{policy}: whole process {median(whole):.2f}x below model's ({listed(whole, '{:.2f}')}), "
                    f"working set {median(memory):.0f}x below ({listed(memory, '{:.0f}')}); "
                    f"tokens/s {median(speed):.2f}x model's, within each round ({listed(speed, '{:.2f}')})")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", table + "\n")


if __name__ == "__main__":
    main()
