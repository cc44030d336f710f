#!/usr/bin/env python
"""Where each schedule's runtime baseline sits, and what moving its measurement point cost:
`baseline_rss_bytes` of this tree against an earlier revision, in interleaved fresh processes.

    python experiments/baseline_point.py --rev 856e6a7 --rounds 3

The earlier revision is checked out into a temporary git worktree and run with the same
interpreter (`PYTHONPATH` puts its package first). This tree runs three times per round:
without the persistent compilation cache (as the revision), with it emptied first (a first
run: compiles and fills it), and with it filled (a later run). Writes experiments/results/baseline_point/summary.md and runs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stagejax_device.paths import default_cache_dir  # noqa: E402
from stagejax_device.results import atomic_write_json, atomic_write_text  # noqa: E402

MIB = 2**20
JOB = ["model=smollm2_135m", "eval.ppl_chunks=0", "decode.max_new_tokens=8", "tracking.mode=disabled"]


def run(label: str, tree: Path, schedule: str, out: Path, extra: list[str] = (), entry=None) -> dict:
    run_dir = out / label.replace(", ", "_").replace(" ", "_").replace("'", "") / schedule
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, *(entry or ["-m", "stagejax.run"]), *JOB, f"schedule={schedule}", *extra,
               f"hydra.run.dir={run_dir}"]
    done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{label} {schedule} failed: {done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"label": label, "schedule": schedule, "baseline_rss_bytes": metrics["baseline_rss_bytes"],
            "decode_peak_rss_bytes": metrics.get("decode_peak_rss_bytes",
                                                 metrics["baseline_rss_bytes"] + metrics["peak_rss_decode_bytes"]),
            "compile_s": metrics["compile_s"]}


def child_rev_point(overrides: list[str]) -> int:
    """`python -m stagejax.run` with `model`'s warm-up moved back after the baseline, where the
    earlier revision ran it (inside `load`, on the real weights)."""
    from stagejax import decode, engine, run as entry

    warm_up = decode.MonolithicDecoder.warm_up
    load = engine.ResidentDecoder.load
    decode.MonolithicDecoder.warm_up = lambda self, params: 0.0

    def load_then_warm_up(self):
        load(self)
        warm_up(self.decoder, self.params)

    engine.ResidentDecoder.load = load_then_warm_up
    sys.argv = [sys.argv[0], *overrides]
    entry.main()
    return 0


def previous_records(runs_file: Path, rev: str, schedules: list[str]) -> list[dict]:
    """Rows of schedules not measured in this invocation, kept from the last one against the
    same revision (so `--schedules model` refreshes `model`'s rows and keeps `atomic`'s)."""
    if not runs_file.exists():
        return []
    previous = json.loads(runs_file.read_text())
    if previous.get("rev") != rev:
        return []
    return [r for r in previous["runs"] if r["schedule"] not in schedules]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child-rev-point":
        return child_rev_point(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="the earlier revision (e.g. 856e6a7)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--schedules", default="model,atomic")
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "baseline_point")
    args = parser.parse_args()
    schedules = args.schedules.split(",")
    work = Path(tempfile.mkdtemp(prefix="baseline-point-"))
    old = work / "rev"
    subprocess.run(["git", "worktree", "add", "--detach", str(old), args.rev], cwd=REPO, check=True,
                   capture_output=True)
    xla_cache = default_cache_dir() / "xla"
    records = []
    try:
        for round_index in range(args.rounds):
            for schedule in schedules:
                out = work / f"r{round_index}"
                records.append(run("rev", old, schedule, out) | {"round": round_index})
                records.append(run("tree, no cache", REPO, schedule, out, ["compile_cache=false"])
                               | {"round": round_index})
                if schedule == "model":  # the same code, its baseline taken where `rev` took it
                    records.append(run("tree, rev's point", REPO, schedule, out, ["compile_cache=false"],
                                       [str(Path(__file__).resolve()), "--child-rev-point"])
                                   | {"round": round_index})
                shutil.rmtree(xla_cache, ignore_errors=True)
                records.append(run("tree, compiling", REPO, schedule, out) | {"round": round_index})
                records.append(run("tree, cached", REPO, schedule, out) | {"round": round_index})
                print(records[-4:], flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    kept = previous_records(args.results / "runs.json", args.rev, schedules)
    records = kept + records
    schedules = sorted({r["schedule"] for r in records}, key=lambda name: name != "model")
    labels = ["rev", "tree, rev's point", "tree, no cache", "tree, compiling", "tree, cached"]
    lines = ["# Runtime baseline: this tree against an earlier revision", "",
             f"`python experiments/baseline_point.py --rev {args.rev} --rounds {args.rounds}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): SmolLM2-135M float32, "
             f"{' '.join(JOB[1:])}; every run a fresh process, rounds interleaved; medians (every "
             "round in brackets), MiB = 2^20 bytes. `rev` measured its baseline before `model`'s "
             "warm-up; this tree measures it after every schedule's warm-up. \"no cache\": "
             "`compile_cache=false` (no persistent compilation cache, as `rev`); \"rev's point\": the "
             "same, with `model`'s warm-up moved back after the baseline (the measurement point "
             "alone, as `rev` placed it); \"compiling\": "
             "the cache emptied first, filled by this run; \"cached\": filled by the run before." +
             (f" Rows of {', '.join(sorted({r['schedule'] for r in kept}))} are kept from an earlier "
              "invocation against the same revision." if kept else ""), "",
             "| schedule | run | baseline MiB | decode peak MiB (whole process) | compile s |",
             "|---|---|---:|---:|---:|"]
    for schedule in schedules:
        for label in labels:
            rows = [r for r in records if r["schedule"] == schedule and r["label"] == label]
            if not rows:
                continue
            base = [r["baseline_rss_bytes"] / MIB for r in rows]
            peak = [r["decode_peak_rss_bytes"] / MIB for r in rows]
            comp = [r["compile_s"] for r in rows]
            fmt = lambda v: f"{statistics.median(v):.1f} ({' / '.join(f'{x:.1f}' for x in v)})"  # noqa: E731
            lines.append(f"| {schedule} | {label} | {fmt(base)} | {fmt(peak)} | {fmt(comp)} |")
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(args.results / "runs.json", {"rev": args.rev, "job": JOB, "runs": records})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
