#!/usr/bin/env python
"""What a new user's first run of the main job measures, and what a later run measures.

    scripts/first_and_later_run.py --cache /tmp/fresh-cache --out experiments/results/first_and_later_run

Runs `python -m stagejax.run paths.cache=<cache> <overrides>` twice, each in a fresh process,
with `--cache` empty at the start (it must not exist): the first run converts the model to
stage shards, calibrates this machine's roofline, compiles the C weight reader and every
executable — the work a fresh clone does once — and the second finds all of that cached.
Then the same job with `schedule=model` (all weights resident) on the same cache: the
baseline a staged run is compared with. Writes `summary.json` and `summary.md` (the headline
metrics of the runs, the load average while each ran) into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stagejax_device.results import atomic_write_json, atomic_write_text  # noqa: E402

KEYS = ("decode_tokens_per_s", "decode_peak_rss_bytes", "baseline_rss_bytes",
        "decode_working_set_bytes", "planned_peak_bytes", "ppl", "compile_s", "compile_helper_s",
        "compile_cache_hits", "compile_cache_misses", "n_executables", "wall_s",
        "exec_to_first_token_s", "time_to_first_token_s")


def run_once(cache: Path, run_dir: Path, overrides: list[str]) -> dict:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stagejax.run", f"paths.cache={cache}",
                    "tracking.mode=disabled", f"hydra.run.dir={run_dir}", *overrides],
                   cwd=REPO, check=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {**{k: metrics.get(k) for k in KEYS},
            "process_s": time.perf_counter() - start,
            "load_average_1min": [load_before, os.getloadavg()[0]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", required=True, help="a paths.cache that does not exist yet")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2,
                        help="alternating atomic/model rounds without the perplexity pass")
    parser.add_argument("overrides", nargs="*", help="more overrides for every run")
    args = parser.parse_args()
    cache, out = Path(args.cache), Path(args.out)
    if cache.exists():
        parser.error(f"--cache {cache} exists: a first run needs an empty cache")
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: run_once(cache, cache.parent / f"{cache.name}-{name}-run", args.overrides)
            for name in ("first", "later")}
    runs["model"] = run_once(cache, cache.parent / f"{cache.name}-model-run",
                             [*args.overrides, "schedule=model"])
    # Like for like: the baseline point of both schedules without the perplexity pass, whose
    # executables run before the baseline, in alternating order, everything cached.
    pairs = []
    for round_index in range(args.rounds):
        for schedule in ("atomic", "model"):
            name = f"{schedule}-no-ppl-{round_index}"
            pairs.append({"schedule": schedule, "round": round_index, **run_once(
                cache, cache.parent / f"{cache.name}-{name}-run",
                [*args.overrides, f"schedule={schedule}", "eval.ppl_chunks=0"])})
    summary = {"command": "python -m stagejax.run " + " ".join(args.overrides),
               "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "cpus": os.cpu_count(), "runs": runs, "without_perplexity": pairs}
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    lines = [f"# First and later run of the main job ({summary['date_utc']} UTC)", "",
             f"`scripts/first_and_later_run.py` — `{summary['command'].strip()}` twice with a new "
             "`paths.cache`, each in a fresh process. The first run converts the model, calibrates "
             "the roofline, compiles the C reader and every executable (a streamed plan in a helper "
             "process, `compile_helper_s`); the later run finds them cached; `model` is the same "
             "job with every weight resident, after both. Load average: the 1-minute figure "
             f"before and after each run (this VM has {summary['cpus']} CPUs and is shared).", "",
             "| run | decode tokens/s | whole process while decoding, MiB | runtime baseline, MiB | "
             "working set, MiB | planned working set, MiB | PPL | compile s (helper s) | "
             "XLA cache misses / hits | process s | load average |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for name, r in runs.items():
        helper = f" ({r['compile_helper_s']:.1f})" if r.get("compile_helper_s") else ""
        lines.append(f"| {name} | {r['decode_tokens_per_s']:.2f} | {mib(r['decode_peak_rss_bytes'])} | "
                     f"{mib(r['baseline_rss_bytes'])} | {mib(r['decode_working_set_bytes'])} | "
                     f"{mib(r['planned_peak_bytes'])} | {r['ppl']:.4f} | {r['compile_s']:.1f}{helper} | "
                     f"{r.get('compile_cache_misses')} / {r.get('compile_cache_hits')} | "
                     f"{r['process_s']:.0f} | {r['load_average_1min'][0]:.1f} → "
                     f"{r['load_average_1min'][1]:.1f} |")
    base = runs["model"]["baseline_rss_bytes"]
    lines += ["", f"Staged baseline above `model`'s: first run "
              f"{mib(runs['first']['baseline_rss_bytes'] - base)} MiB, later run "
              f"{mib(runs['later']['baseline_rss_bytes'] - base)} MiB.", "",
              "Without the perplexity pass (`eval.ppl_chunks=0`: its executables run before the "
              "baseline and differ between schedules), cached, `atomic` and `model` alternating:",
              "", "| round | schedule | runtime baseline, MiB | whole process while decoding, MiB | "
              "compile s (helper s) |", "|---:|---|---:|---:|---:|"]
    for r in pairs:
        helper = f" ({r['compile_helper_s']:.1f})" if r.get("compile_helper_s") else ""
        lines.append(f"| {r['round']} | {r['schedule']} | {mib(r['baseline_rss_bytes'])} | "
                     f"{mib(r['decode_peak_rss_bytes'])} | {r['compile_s']:.1f}{helper} |")
    for schedule in ("atomic", "model"):
        values = sorted(r["baseline_rss_bytes"] for r in pairs if r["schedule"] == schedule)
        summary[f"median_baseline_no_ppl_{schedule}"] = values[len(values) // 2]
    gap = summary["median_baseline_no_ppl_atomic"] - summary["median_baseline_no_ppl_model"]
    lines += ["", f"Median baselines without perplexity: `atomic` {mib(summary['median_baseline_no_ppl_atomic'])}"
              f" MiB, `model` {mib(summary['median_baseline_no_ppl_model'])} MiB: staged − model = "
              f"{mib(gap)} MiB."]
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
