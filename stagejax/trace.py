"""One decode step as a Chrome / Perfetto trace: what each group did, and when.

Reads a run's `timeline.json` (written by `stagejax.experiment`: one untimed, instrumented
decode step) and writes `trace.json` in the Trace Event Format's JSON-object form
(`{"traceEvents": [...]}`, timestamps in microseconds), which `chrome://tracing` and
https://ui.perfetto.dev open directly. Format: "Trace Event Format", Google,
https://docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU

Tracks (one process, "decode step"):
  - `executor` thread: one complete event per group, split into "wait" (blocked on its
    weights or KV, `io_wait_s`) and "compute"; an instant "free" event where the group
    released its buffers; the group's memory in its args.
  - `prefetch loads` thread: one complete event per read of a unit of weights (`loads`).
  - counters: resident memory above the runtime baseline (RSS after the group and its
    high-water mark while it ran), live JAX bytes, the plan's predicted peak.

Timeline records carry `start_s`/`end_s`/`io_wait_s` per group (seconds from the step's
start) and a `loads` list of `{group, start_s, end_s, bytes}` (the prefetcher's reads; `unit`
is accepted for `group`). Older timelines have only `elapsed_s` per group: groups are
then laid end to end (marked `"timing": "reconstructed from elapsed_s"`), and there is no
load track. The timeline file is either the list of group records or an object with `groups`
(or `steps`) and `loads`.

    python -m stagejax.trace <run dir> [--out trace.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from stagejax_device.results import atomic_write_json

PID = 1
EXECUTOR_TID = 1
LOADS_TID = 2
MB = 2**20
_GROUP_KEYS = ("groups", "steps", "records")


def split_timeline(data: Any) -> tuple[list[dict], list[dict]]:
    """(per-group records, prefetch loads) from a parsed timeline.json in either form."""
    if isinstance(data, list):
        return data, []
    if isinstance(data, dict):
        groups = next((data[k] for k in _GROUP_KEYS if k in data), None)
        if groups is None:
            raise ValueError(f"timeline has none of the keys {_GROUP_KEYS}: found {sorted(data)}")
        return list(groups), list(data.get("loads") or [])
    raise ValueError(f"timeline must be a list of group records or an object, got {type(data).__name__}")


def read_timeline(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    path = Path(run_dir) / "timeline.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the job first (python -m stagejax.run)")
    return split_timeline(json.loads(path.read_text()))


def _group_spans(groups: Sequence[dict], mean_step_s: float | None) -> tuple[list[tuple[float, float]], str]:
    """(start_s, end_s) of each group, and how they were obtained."""
    if groups and all("start_s" in g and "end_s" in g for g in groups):
        return [(float(g["start_s"]), float(g["end_s"])) for g in groups], "measured"
    if all("elapsed_s" in g for g in groups):
        spans, t = [], 0.0
        for g in groups:
            spans.append((t, t + float(g["elapsed_s"])))
            t += float(g["elapsed_s"])
        return spans, "reconstructed from elapsed_s"
    if len(groups) == 1 and mean_step_s:
        # `model` runs its step as one executable and records no per-group time.
        return [(0.0, mean_step_s)], "mean decode step time (metrics)"
    return [(0.0, 0.0) for _ in groups], "unknown (no times recorded)"


def chrome_trace(groups: Sequence[dict], loads: Sequence[dict] = (), metrics: dict | None = None,
                 title: str | None = None) -> dict:
    """The Trace Event Format object of one decode step.

    Args:
      groups: per-group records of timeline.json (`group`, memory fields, times).
      loads: prefetch reads `{group, start_s, end_s, bytes}` (may be empty).
      metrics: the run's metrics.json, for the baseline (memory counters above it), the
        run's name, and `model`'s step time.
    """
    if not groups:
        raise ValueError("the timeline has no group records: nothing to trace")
    metrics = metrics or {}
    baseline = int(metrics.get("baseline_rss_bytes") or 0)
    tps = metrics.get("decode_tokens_per_s")
    spans, timing = _group_spans(groups, 1.0 / tps if tps else None)
    starts = [s for s, _ in spans] + [float(l["start_s"]) for l in loads if "start_s" in l]
    origin = min(starts)

    def us(t: float) -> float:  # seconds on the run's clock -> trace microseconds (ns resolution)
        return round((t - origin) * 1e6, 3)

    if title is None:
        title = " ".join(str(metrics[k]) for k in ("model", "schedule", "quant", "cache") if k in metrics)
    events: list[dict] = [
        {"ph": "M", "pid": PID, "name": "process_name", "args": {"name": f"decode step {title}".strip()}},
        {"ph": "M", "pid": PID, "tid": EXECUTOR_TID, "name": "thread_name", "args": {"name": "executor"}},
        {"ph": "M", "pid": PID, "tid": EXECUTOR_TID, "name": "thread_sort_index", "args": {"sort_index": 0}},
    ]
    if loads:
        events += [
            {"ph": "M", "pid": PID, "tid": LOADS_TID, "name": "thread_name", "args": {"name": "prefetch loads"}},
            {"ph": "M", "pid": PID, "tid": LOADS_TID, "name": "thread_sort_index", "args": {"sort_index": 1}},
        ]
    for record, (start, end) in zip(groups, spans):
        name = str(record.get("group", "?"))
        fields = {k: record[k] for k in ("rss_bytes", "peak_rss_bytes", "live_jax_bytes",
                                          "planned_peak_bytes", "io_wait_s") if k in record}
        # Round once to nanoseconds and derive the children from the rounded ends, so "wait" and
        # "compute" nest exactly inside their group (viewers reject children that overhang).
        ts_start, ts_end = us(start), max(us(end), us(start))
        events.append({"ph": "X", "pid": PID, "tid": EXECUTOR_TID, "name": name, "cat": "group",
                       "ts": ts_start, "dur": ts_end - ts_start,
                       "args": {**fields, "timing": timing}})
        if "io_wait_s" in record:
            ts_wait_end = min(max(us(start + max(float(record["io_wait_s"] or 0.0), 0.0)), ts_start), ts_end)
            if ts_wait_end > ts_start:
                events.append({"ph": "X", "pid": PID, "tid": EXECUTOR_TID, "name": "wait", "cat": "io",
                               "ts": ts_start, "dur": ts_wait_end - ts_start, "args": {"group": name}})
            events.append({"ph": "X", "pid": PID, "tid": EXECUTOR_TID, "name": "compute", "cat": "compute",
                           "ts": ts_wait_end, "dur": ts_end - ts_wait_end, "args": {"group": name}})
        events.append({"ph": "i", "s": "t", "pid": PID, "tid": EXECUTOR_TID, "name": "free",
                       "cat": "free", "ts": ts_end, "args": {"group": name}})
        counters = {}
        if "rss_bytes" in record:
            counters["RSS above baseline (MB)"] = {"after group": (record["rss_bytes"] - baseline) / MB,
                                                   "high-water": (record.get("peak_rss_bytes", record["rss_bytes"]) - baseline) / MB}
        if "planned_peak_bytes" in record:
            counters["planned peak (MB)"] = {"planned": record["planned_peak_bytes"] / MB}
        if "live_jax_bytes" in record:
            counters["live JAX arrays (MB)"] = {"live": record["live_jax_bytes"] / MB}
        for counter, values in counters.items():
            events.append({"ph": "C", "pid": PID, "name": counter, "ts": us(end), "args": values})
    for load in loads:
        start, end = float(load["start_s"]), float(load["end_s"])
        unit = load.get("group", load.get("unit"))  # the group whose weights were read
        n_bytes = int(load.get("bytes") or 0)
        args = {"group": unit, "bytes": n_bytes}
        if end > start and n_bytes:
            args["MB_per_s"] = n_bytes / MB / (end - start)
        events.append({"ph": "X", "pid": PID, "tid": LOADS_TID, "name": f"load {unit}",
                       "cat": "load", "ts": us(start), "dur": max(us(end) - us(start), 0.0), "args": args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"source": "stagejax timeline.json", "timing": timing,
                          "baseline_rss_bytes": baseline, "n_groups": len(groups), "n_loads": len(loads)}}


def write_trace(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the trace of a run directory's timeline (default: `<run dir>/trace.json`)."""
    run_dir = Path(run_dir)
    groups, loads = read_timeline(run_dir)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    return atomic_write_json(out or run_dir / "trace.json", chrome_trace(groups, loads, metrics))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Chrome/Perfetto trace of one decode step of a run.")
    parser.add_argument("run_dir", help="a run directory holding timeline.json (and metrics.json)")
    parser.add_argument("--out", help="output file (default: <run_dir>/trace.json)")
    args = parser.parse_args(argv)
    path = write_trace(args.run_dir, args.out)
    print(f"{path}  (open in https://ui.perfetto.dev or chrome://tracing)")


if __name__ == "__main__":
    main()
