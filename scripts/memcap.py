#!/usr/bin/env python
"""Run the main job under a real memory cap (a cgroup limit), in one of two modes.

Whole process, from exec (what a device owner asks: "with N MB, does it run, and how fast?"):

    scripts/memcap.py --from-start --cap-mb 450 -- schedule=atomic quant=gguf_native cache=disk
    scripts/memcap.py --from-start --find-min -- schedule=atomic eval.ppl_chunks=0

  The machine's page cache is dropped (`/proc/sys/vm/drop_caches`, recorded), then
  `python -m stagejax.run <overrides>` starts inside a new cgroup whose limit is already set:
  interpreter, libraries, compilation, weights, KV and the page cache of every file the job
  reads are charged to it. The report says whether the job completed, was killed (and in which
  phase, from the run's `phase.json`), or ran past `--time-limit-s` (killed, never a hang),
  with the cgroup's peak and the job's metrics. `--find-min` bisects the cap between
  `--min-mb` and `--max-mb` (128 and 1024 by default) to `--resolution-mb` (16) and reports
  the smallest cap that completes and the tokens/s there.

Working set, from decode start (the earlier mode, kept and named for what it bounds):

    scripts/memcap.py --at-decode-start --budget-mb 4 --margin-mb 16 -- schedule=atomic cache=disk

  The job runs uncapped until decoding starts; then it has the kernel reclaim the page cache
  charged to its cgroup and sets the limit to the cgroup's remaining usage (its runtime as the
  kernel accounts it) + budget + margin, lifted when the experiment returns. This bounds the
  decode's working set above the runtime, not what the whole process needs. Without
  `--budget-mb` the budget is `schedule.budget_mb` if overridden, else the plan's predicted
  peak from a short uncapped probe run. `store.drop_page_cache=true` is added so decode reads
  weights from storage.

Why not `prlimit --as` / RLIMIT_AS: it limits virtual address space, not resident memory (XLA
reserves far more than it touches; docs/harness.md §5).

Exit status: 0 the job completed under the cap (`--find-min`: some cap completed); 1 it did not;
2 no usable cgroup memory controller here.
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

from stagejax.memcap import (COMPLETED, Cgroup, CgroupUnavailable, create_cgroup,  # noqa: E402
                             find_memory_cgroup, run_from_start)
from stagejax_device.results import atomic_write_json, atomic_write_text  # noqa: E402

MB = 2**20
MEMCAP_ENV = "STAGEJAX_MEMCAP"  # the protocol read by stagejax.run.MemoryCap
# Re-exported for callers of this script as a module.
__all__ = ["Cgroup", "CgroupUnavailable", "find_memory_cgroup", "main"]


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _with(overrides: list[str], extra: dict[str, str], replace: bool) -> list[str]:
    """`overrides` plus `extra` (key -> value); `replace`: extra wins over the user's value."""
    keys = {_key(o) for o in overrides}
    kept = [o for o in overrides if not (replace and _key(o) in extra)]
    return kept + [f"{k}={v}" for k, v in extra.items() if replace or k not in keys]


def job_command(python: str, overrides: list[str], run_dir: Path) -> list[str]:
    return [python, "-m", "stagejax.run", *overrides, f"hydra.run.dir={run_dir}"]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- whole process, from exec ----------------------------------------------------------------


def capped_probe(python: str, overrides: list[str], cap_bytes: int, run_dir: Path,
                 time_limit_s: float, drop_cache: bool = True) -> dict:
    """One fresh job capped from exec at `cap_bytes`: its CappedRun record plus the metrics a
    completed job wrote."""
    command = job_command(python, overrides, run_dir)
    print(f"memcap: cap {cap_bytes / MB:,.0f} MiB from exec: $ {' '.join(command)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.log", "w") as log:
        outcome = run_from_start(command, cap_bytes, time_limit_s=time_limit_s, run_dir=run_dir,
                                 cwd=REPO, drop_cache=drop_cache, stdout=log, stderr=subprocess.STDOUT)
    metrics = _read_json(run_dir / "metrics.json") if outcome.completed else None
    record = outcome.record() | {"run_dir": str(run_dir), "overrides": overrides}
    if metrics:
        record.update({key: metrics.get(key) for key in (
            "decode_tokens_per_s", "exec_to_first_token_s", "decode_peak_rss_bytes", "peak_rss_bytes",
            "baseline_rss_bytes", "decode_working_set_bytes", "planned_peak_bytes", "compile_s",
            "generated_tokens", "io_wait_frac")})
    print("memcap: " + describe_probe(record), flush=True)
    return record


def describe_probe(r: dict) -> str:
    mb = lambda b: "—" if b is None else f"{b / MB:,.1f} MiB"  # noqa: E731
    if r["status"] == COMPLETED:
        what = (f"completed: {r.get('decode_tokens_per_s') or 0:.2f} tokens/s, first token "
                f"{r.get('exec_to_first_token_s') or 0:.1f} s after exec, decode peak RSS "
                f"{mb(r.get('decode_peak_rss_bytes'))}")
    elif r["status"] == "killed":
        what = f"KILLED by the OOM killer in phase '{r['phase'] or 'startup'}'"
    elif r["status"] == "over time limit":
        what = f"OVER its time limit in phase '{r['phase'] or 'startup'}' (killed)"
    else:
        what = f"FAILED (exit {r['returncode']}) in phase '{r['phase'] or 'startup'}'; see {r['run_dir']}/run.log"
    return (f"cap {r['cap_bytes'] / MB:,.0f} MiB: {what}; cgroup peak {mb(r['cgroup_peak_bytes'])} "
            f"(page cache included), {r['wall_s']:.0f} s")


def find_min_cap(python: str, overrides: list[str], out: Path, min_bytes: int, max_bytes: int,
                 resolution_bytes: int, time_limit_s: float, drop_cache: bool = True) -> dict:
    """Bisect the smallest whole-process cap (a multiple of the resolution) at which the job
    completes, assuming a job that completes under a cap completes under any larger one."""
    probes: dict[int, dict] = {}

    def probe(cap: int) -> bool:
        if cap not in probes:
            probes[cap] = capped_probe(python, overrides, cap, out / f"cap_{cap // MB}MiB", time_limit_s,
                                       drop_cache)
        return probes[cap]["status"] == COMPLETED

    lo, hi = min_bytes, max_bytes
    if not probe(hi):
        smallest = None
    elif probe(lo):
        smallest = lo
    else:  # invariant: lo fails, hi completes
        while hi - lo > resolution_bytes:
            mid = lo + (hi - lo) // 2 // resolution_bytes * resolution_bytes
            mid = max(mid, lo + resolution_bytes)
            if probe(mid):
                hi = mid
            else:
                lo = mid
        smallest = hi
    return {"mode": "from start, find min", "smallest_completing_cap_bytes": smallest,
            "largest_failing_cap_bytes": max((c for c, p in probes.items() if p["status"] != COMPLETED),
                                             default=None),
            "min_bytes": min_bytes, "max_bytes": max_bytes, "resolution_bytes": resolution_bytes,
            "time_limit_s": time_limit_s,
            "at_smallest": probes.get(smallest) if smallest is not None else None,
            "probes": [probes[c] for c in sorted(probes)]}


def format_find_min(report: dict) -> str:
    mb = lambda b: f"{b / MB:,.0f} MiB"  # noqa: E731
    lines = [f"memcap: whole-process caps probed from exec (page cache dropped before each), "
             f"{mb(report['min_bytes'])}..{mb(report['max_bytes'])} at {mb(report['resolution_bytes'])} "
             f"resolution, {report['time_limit_s']:.0f} s per probe:"]
    lines += ["  " + describe_probe(p) for p in report["probes"]]
    smallest = report["smallest_completing_cap_bytes"]
    if smallest is None:
        lines.append(f"  no cap up to {mb(report['max_bytes'])} completed: raise --max-mb")
    else:
        at = report["at_smallest"]
        lines.append(f"  smallest cap that completes: {mb(smallest)} "
                     f"({at.get('decode_tokens_per_s') or 0:.2f} tokens/s there)"
                     + ("" if smallest == report["min_bytes"] else
                        f"; {mb(report['largest_failing_cap_bytes'])} did not"))
    return "\n".join(lines)


def shared_note(probes: list[dict]) -> str:
    shared = [p for p in probes if p.get("other_processes_mapping")]
    if not shared:
        return "No other process had the job's libraries mapped during any probe."
    return (f"In {len(shared)} of {len(probes)} probes other processes had the job's libraries mapped "
            "(their pages were not charged to the probe's cgroup, so those caps covered less than "
            "on a machine running the job alone): "
            + "; ".join(f"{p['cap_bytes'] // MB} MiB: {', '.join(p['other_processes_mapping'])}" for p in shared)
            + ".")


def find_min_summary(report: dict, argv: list[str]) -> str:
    """The report as a markdown table, without the run directories' absolute paths (for a
    results directory that is committed)."""
    mib = lambda b: "—" if b is None else f"{b / MB:,.1f}"  # noqa: E731
    smallest = report["smallest_completing_cap_bytes"]
    lines = [f"# Smallest whole-process cap ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"`scripts/memcap.py {' '.join(argv)}`: each probe a fresh `python -m stagejax.run` "
             "capped from exec (cgroup limit set before the interpreter starts; page cache "
             f"dropped before each probe: {'yes' if all(r['page_cache'].get('page_cache_dropped') for r in report['probes']) else 'no'}), "
             f"bisected between {mib(report['min_bytes'])} and {mib(report['max_bytes'])} MiB at "
             f"{mib(report['resolution_bytes'])} MiB, {report['time_limit_s']:.0f} s per probe. "
             + shared_note(report["probes"]), "",
             f"**Smallest cap that completes: {mib(smallest)} MiB**" +
             ("" if smallest is None else f" ({(report['at_smallest'].get('decode_tokens_per_s') or 0):.2f} "
              "tokens/s there)") + ".", "",
             "| cap MiB | outcome | phase | tokens/s | exec to first token s | decode peak RSS MiB | "
             "cgroup peak MiB (page cache included) | wall s |", "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in report["probes"]:
        tps = r.get("decode_tokens_per_s")
        ttft = r.get("exec_to_first_token_s")
        lines.append(f"| {mib(r['cap_bytes'])} | {r['status']} | {r.get('phase') or '—'} | "
                     f"{'—' if tps is None else f'{tps:.2f}'} | {'—' if ttft is None else f'{ttft:.1f}'} | "
                     f"{mib(r.get('decode_peak_rss_bytes'))} | {mib(r.get('cgroup_peak_bytes'))} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


# ---- working set, from decode start -----------------------------------------------------------


def probe_budget(python: str, overrides: list[str], out: Path) -> int:
    """The plan's predicted decode peak, from a short uncapped run of the same configuration."""
    probe = _with(overrides, {"decode.max_new_tokens": "2", "eval.ppl_chunks": "0",
                              "tracking.mode": "disabled"}, replace=True)
    run_dir = out / "probe"
    command = job_command(python, probe, run_dir)
    print("memcap: $ " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise SystemExit(f"memcap: the uncapped probe run failed (see {run_dir}); fix the "
                         "configuration or pass --budget-mb")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"memcap: probe: planned decode peak {metrics['planned_peak_bytes'] / MB:.1f} MiB, runtime "
          f"baseline {metrics['baseline_rss_bytes'] / MB:.1f} MiB", flush=True)
    return int(metrics["planned_peak_bytes"])


def at_decode_start(args, overrides: list[str], out: Path, parent: Path, version: int) -> int:
    user_budget = next((o.split("=", 1)[1] for o in overrides if _key(o) == "schedule.budget_mb"), None)
    if args.budget_mb is not None:
        budget, budget_source = int(args.budget_mb * MB), "--budget-mb"
    elif user_budget not in (None, "null"):
        budget, budget_source = int(float(user_budget) * MB), "schedule.budget_mb"
    else:
        budget, budget_source = probe_budget(args.python, overrides, out), "planned_peak_bytes (probe run)"
    margin = int(args.margin_mb * MB)
    try:
        cgroup = create_cgroup(parent, version, f"stagejax-memcap-{os.getpid()}")
    except CgroupUnavailable as error:
        print(f"memcap: cannot cap memory on this machine: {error}", file=sys.stderr)
        return 2
    run_dir = out / "capped"
    env = dict(os.environ, **{MEMCAP_ENV: json.dumps(cgroup.protocol(budget + margin))})
    capped = _with(overrides, {"store.drop_page_cache": "true"}, replace=False)
    command = job_command(args.python, capped, run_dir)
    print("memcap: $ " + " ".join(command), flush=True)
    try:
        returncode = subprocess.run(command, cwd=REPO, env=env, preexec_fn=cgroup.join).returncode
        cap = _read_json(run_dir / "memcap.json") or {}
        metrics = _read_json(run_dir / "metrics.json")
        oom_kills = cgroup.oom_kills()
        if not cap:  # killed (SIGKILL leaves no memcap.json): read what the cgroup still holds
            cap = cgroup.state_after_kill(budget + margin)
    finally:
        removed = cgroup.remove()
    completed = returncode == 0 and metrics is not None
    report = {
        "mode": "at decode start (working set above the runtime)",
        "completed": completed, "returncode": returncode, "cgroup": str(cgroup.path),
        "cgroup_version": version, "cgroup_removed": removed, "budget_bytes": budget,
        "budget_source": budget_source, "margin_bytes": margin, "oom_kills": oom_kills,
        "run_dir": str(run_dir), "overrides": capped, **cap,
        "decode_working_set_bytes": metrics and metrics.get("decode_working_set_bytes"),
        "decode_peak_rss_bytes": metrics and metrics.get("decode_peak_rss_bytes"),
        "baseline_rss_bytes": metrics and metrics.get("baseline_rss_bytes"),
        "decode_tokens_per_s": metrics and metrics.get("decode_tokens_per_s"),
    }
    atomic_write_json(out / "memcap_report.json", report)
    print(format_decode_start(report))
    return 0 if completed else 1


def format_decode_start(r: dict) -> str:
    mb = lambda b: "—" if b is None else f"{b / MB:,.1f} MiB"  # noqa: E731
    lines = [f"memcap: cgroup v{r['cgroup_version']} {r['cgroup']}"
             + ("" if r["cgroup_removed"] else " (still present: remove it with rmdir)"),
             "  mode: cap applied at decode start — it bounds the decode's working set above the "
             "runtime, not the whole process (for that: --from-start)"]
    if "limit_bytes" in r:
        lines.append(f"  cap {mb(r['limit_bytes'])} = cgroup usage at decode start "
                     f"{mb(r['cgroup_usage_at_cap_bytes'])} (page cache reclaimed) + budget "
                     f"{mb(r['budget_bytes'])} ({r['budget_source']}) + margin {mb(r['margin_bytes'])}; "
                     "lifted after the experiment")
        lines.append(f"  for comparison: RSS at decode start {mb(r.get('rss_at_cap_bytes'))}, runtime "
                     f"baseline (baseline_rss_bytes) {mb(r.get('baseline_rss_bytes'))}")
    else:
        lines.append(f"  the cap was never applied (budget {mb(r['budget_bytes'])}, margin "
                     f"{mb(r['margin_bytes'])}): the job ended before decoding")
    if r["completed"]:
        lines.append("  job: completed under the cap")
    elif r["returncode"] == -9 or r.get("oom_kills"):
        lines.append(f"  job: KILLED by the kernel's OOM killer inside the cgroup (exit {r['returncode']}, "
                     f"{r.get('oom_kills')} OOM kill(s)): the cap is too small for this configuration")
    else:
        lines.append(f"  job: FAILED (exit {r['returncode']}); see {r['run_dir']}/run.log")
    peak, usage, limit = r.get("cgroup_peak_bytes"), r.get("cgroup_usage_at_cap_bytes"), r.get("limit_bytes")
    above = f" ({mb(peak - usage)} above the usage at decode start)" if peak is not None and usage is not None else ""
    at_limit = ("; it reached the limit: the kernel reclaimed page cache to keep it under"
                if peak is not None and limit is not None and peak >= limit - 4096 else "")
    lines.append(f"  measured: cgroup peak while capped {mb(peak)}{above}, page cache included{at_limit}; "
                 f"decode peak RSS {mb(r.get('decode_peak_rss_bytes'))} for the whole process, "
                 f"{mb(r.get('decode_working_set_bytes'))} above the runtime baseline")
    lines.append(f"  results: {r['run_dir']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run `python -m stagejax.run <overrides>` under a cgroup memory cap: the whole "
                    "process from exec (--from-start), or the working set from decode start "
                    "(--at-decode-start, the default).",
        epilog="Everything after the options (or after --) is passed to stagejax.run as hydra overrides.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--from-start", action="store_true",
                      help="cap the whole process from exec, page cache dropped first")
    mode.add_argument("--at-decode-start", action="store_true",
                      help="cap runtime usage at decode start + budget + margin (default)")
    parser.add_argument("--cap-mb", type=float, help="--from-start: the cap, MiB")
    parser.add_argument("--find-min", action="store_true",
                        help="--from-start: bisect the smallest cap that completes")
    parser.add_argument("--min-mb", type=float, default=128.0, help="--find-min: lower end (default 128)")
    parser.add_argument("--max-mb", type=float, default=1024.0, help="--find-min: upper end (default 1024)")
    parser.add_argument("--resolution-mb", type=float, default=16.0,
                        help="--find-min: resolution (default 16)")
    parser.add_argument("--time-limit-s", type=float, default=900.0,
                        help="--from-start: a job running longer is killed and reported as over its "
                             "time limit (default 900)")
    parser.add_argument("--keep-page-cache", action="store_true",
                        help="--from-start: do not drop the machine's page cache first (files cached by "
                             "other processes are then free to the job; recorded in the report)")
    parser.add_argument("--budget-mb", type=float,
                        help="--at-decode-start: memory above the runtime the decode may use (default: "
                             "schedule.budget_mb if overridden, else the plan's predicted peak from a "
                             "short probe run)")
    parser.add_argument("--margin-mb", type=float, default=16.0,
                        help="--at-decode-start: added to the budget: kernel memory, page tables and RSS "
                             "noise that the cgroup charges but the plan does not model (default 16)")
    parser.add_argument("--out", help="directory for the run(s) and the report "
                                      "(default outputs/memcap/<date>_<time>)")
    parser.add_argument("--python", default=sys.executable, help="interpreter running the job")
    parser.add_argument("--proc-mounts", default="/proc/self/mounts", help=argparse.SUPPRESS)  # tests
    parser.add_argument("--proc-cgroup", default="/proc/self/cgroup", help=argparse.SUPPRESS)  # tests
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; hydra overrides look like key=value")
    if args.margin_mb < 0 or (args.budget_mb is not None and args.budget_mb < 0):
        parser.error("--budget-mb and --margin-mb must be >= 0")
    if args.from_start:
        if (args.cap_mb is None) == (not args.find_min):
            parser.error("--from-start needs exactly one of --cap-mb N or --find-min")
        if args.find_min and not (0 < args.resolution_mb and 0 < args.min_mb < args.max_mb):
            parser.error("--find-min needs --resolution-mb > 0 and 0 < --min-mb < --max-mb")
        if args.budget_mb is not None:
            parser.error("--budget-mb belongs to --at-decode-start; --from-start caps with --cap-mb")
    elif args.cap_mb is not None or args.find_min:
        parser.error("--cap-mb and --find-min need --from-start")

    try:
        parent, version = find_memory_cgroup(args.proc_mounts, args.proc_cgroup)
    except CgroupUnavailable as error:
        print(f"memcap: cannot cap memory on this machine: {error}", file=sys.stderr)
        return 2
    out = Path(args.out or REPO / "outputs" / "memcap" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.from_start:
        return at_decode_start(args, overrides, out, parent, version)
    if args.find_min:
        report = find_min_cap(args.python, overrides, out, int(args.min_mb * MB), int(args.max_mb * MB),
                              int(args.resolution_mb * MB), args.time_limit_s, not args.keep_page_cache)
        atomic_write_json(out / "memcap_report.json", report)
        atomic_write_text(out / "summary.md", find_min_summary(report, argv if argv is not None else sys.argv[1:]))
        print(format_find_min(report))
        return 0 if report["smallest_completing_cap_bytes"] is not None else 1
    record = capped_probe(args.python, overrides, int(args.cap_mb * MB), out / "capped", args.time_limit_s,
                          not args.keep_page_cache)
    atomic_write_json(out / "memcap_report.json", {"mode": "from start"} | record)
    return 0 if record["status"] == COMPLETED else 1


if __name__ == "__main__":
    sys.exit(main())
