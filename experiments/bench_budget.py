"""RAM-budget sweep: `budget`, `similar_size` and `optimal` on SmolLM2 float32,
context ~512 (KV on disk), in one run — measured tokens/s and decode peak against the plan's
predicted peak and step time.

Each job runs in a fresh process (`experiments/runs.py`). A budget below what the finest stage
needs is reported with the planner's error message (the infeasible-budget check).

This VM's timings drift by tens of percent over minutes (one plan measured 63.5 and 89.3 ms per
step in two sweeps an hour apart), so the sweep runs in `--rounds` interleaved rounds (every
budget and policy once, then again): a job's measured step is the median over rounds, every
round's value listed, and prediction errors and optimal/budget ratios are taken on medians.

    .venv/bin/python experiments/bench_budget.py [--budgets 2,4,8,16,32,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, run_isolated, smollm2_settings  # noqa: E402

POLICIES = ("budget", "similar_size", "optimal")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="2,4,8,16,32,64", help="MB, comma-separated")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--ffn-chunks", type=int, default=16)
    parser.add_argument("--vocab-chunk", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "budget_smollm2"))
    args = parser.parse_args()

    from stagejax_device.results import atomic_write_json, atomic_write_text

    out = Path(args.out)
    jobs = [(float(b), policy) for b in args.budgets.split(",") for policy in args.policies.split(",")]
    by_job: dict[tuple, list[dict]] = {job: [] for job in jobs}
    for r in range(args.rounds):
        for budget, policy in jobs:
            if r and "error" in by_job[(budget, policy)][0]:
                continue  # an infeasible budget is refused by the planner, the same every round
            name = f"{policy}-{budget:g}MB"
            print(f"round {r + 1}/{args.rounds}: {name} ...", flush=True)
            settings = smollm2_settings(policy, new_tokens=args.new_tokens, schedule=dict(
                budget_mb=budget, ffn_chunks=args.ffn_chunks, vocab_chunk=args.vocab_chunk))
            metrics = run_isolated(settings, out / name / f"round{r + 1}")
            by_job[(budget, policy)].append(metrics)
            if "error" in metrics:
                print(f"  {metrics['error']}")
    rows = [_combined(budget, policy, runs) for (budget, policy), runs in by_job.items()]

    mb = 2 ** 20
    lines = [f"SmolLM2-135M float32, context {next((r['prompt_tokens'] for r in rows if 'prompt_tokens' in r), '?')}"
             f"+{args.new_tokens} tokens, KV on disk, ffn_chunks {args.ffn_chunks}, vocab_chunk "
             f"{args.vocab_chunk}, prefetch depth 2, warm page cache; predictions from the "
             f"calibrated roofline (conf/device/this_machine); {args.rounds} interleaved rounds, "
             f"each run a fresh process: medians over rounds, measured ms/step of every round "
             f"in brackets", "",
             "Whole process: the run's peak RSS; working set: the decode's peak above the runtime "
             "baseline (RSS after warm-up, before weights), beside the plan; the plan also holds "
             "the prefill passes (`planned_prefill_peak_bytes`). MB = 2^20 bytes.", "",
             "| budget MB | policy | groups | whole-process peak MB | runtime baseline MB | "
             "planned peak MB (decode / prefill) | working set MB (max) | tokens/s | "
             "predicted ms/step (sum) | predicted ms/step (pipeline) | measured ms/step | "
             "sum/measured | pipeline/measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['budget_mb']:g} | {r['policy']} | infeasible: {r['error'][:160]} | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['budget_mb']:g} | {r['policy']} | {r['n_groups']} | {r['peak_rss_bytes'] / mb:.1f} | "
            f"{r['baseline_rss_bytes'] / mb:.1f} | {r['planned_peak_bytes'] / mb:.2f} / "
            f"{r.get('planned_prefill_peak_bytes', float('nan')) / mb:.2f} | "
            f"{r['decode_working_set_bytes'] / mb:.2f} ({max(r['decode_working_set_bytes_rounds']) / mb:.2f}) | "
            f"{r['decode_tokens_per_s']:.2f} | "
            f"{r['predicted_step_s'] * 1e3:.1f} | {r['predicted_pipeline_step_s'] * 1e3:.1f} | "
            f"{r['measured_step_s'] * 1e3:.1f} ({' / '.join(f'{m * 1e3:.1f}' for m in r['measured_step_s_rounds'])}) | "
            f"{r['predicted_step_s'] / r['measured_step_s']:.2f} | "
            f"{r['predicted_pipeline_step_s'] / r['measured_step_s']:.2f} |")
    ok = [r for r in rows if "error" not in r]
    by = {(r["budget_mb"], r["policy"]): r for r in ok}
    lines.append("")
    for budget in sorted({r["budget_mb"] for r in ok}):
        if (budget, "optimal") in by and (budget, "budget") in by:
            ratio = by[(budget, "optimal")]["decode_tokens_per_s"] / by[(budget, "budget")]["decode_tokens_per_s"]
            lines.append(f"budget {budget:g} MB: optimal / budget tokens/s = {ratio:.2f}x")
    for key, name in (("predicted_step_s", "sum (the DP's objective)"),
                      ("predicted_pipeline_step_s", "pipeline (event simulation)")):
        errors = sorted(abs(r[key] / r["measured_step_s"] - 1) for r in ok)
        if errors:
            lines.append(f"prediction error |predicted/measured - 1|, {name}: median "
                         f"{errors[len(errors) // 2]:.0%}, max {errors[-1]:.0%}, within 25% "
                         f"{sum(e <= 0.25 for e in errors)} of {len(errors)} runs")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(out / "summary.json", {"rows": rows})
    atomic_write_text(out / "summary.md", table + "\n")


def _combined(budget: float, policy: str, runs: list[dict]) -> dict:
    """One row per job: the first round's plan facts, medians over rounds of what is measured
    (and of the predictions, which use each run's own warm read-rate measurement)."""
    row = {"policy": policy, "budget_mb": budget, **runs[0]}
    if "error" in row:
        return row
    for key in ("decode_working_set_bytes", "peak_rss_bytes", "baseline_rss_bytes",
                "decode_tokens_per_s", "measured_step_s",
                "predicted_step_s", "predicted_pipeline_step_s"):
        row[key] = statistics.median(r[key] for r in runs)
        row[f"{key}_rounds"] = [r[key] for r in runs]
    return row


if __name__ == "__main__":
    main()
