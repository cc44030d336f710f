"""Predicted vs measured latency of the roofline, per schedule and per group.

Reads finished run directories of the main job (`stagejax.experiment.run_experiment`) as data —
`metrics.json` (the planner's step predictions beside the measured step) and `plan.json` (per
group: stage ids, bytes, FLOPs, the roofline's predicted seconds and the seconds the group took
in one instrumented decode step) — and writes:

  - `predicted_vs_measured.md`: a per-schedule table (both step predictions against the measured
    step), a per-group-kind table for each staged run, the error statistics over all runs;
  - `schedules.csv`, `kinds.csv`, `groups.csv` and `predicted_vs_measured.json`: the same numbers;
  - `roofline.png`: every group of every staged run at (FLOPs per byte moved, achieved FLOP/s)
    under the device's roofline (Williams, Waterman & Patterson, CACM 2009);
  - `predicted_vs_measured.png`: predicted against measured seconds per group.

Definitions (what the numbers mean):
  * step predictions: `predicted_step_s` is the planner's separable sum (per group max(compute,
    load) with prefetch, compute + load without; compute only for `model`),
    `predicted_pipeline_step_s` the roofline's event simulation of the prefetch pipeline
    (`stagejax.roofline.predict_step`); measured = 1 / decode tokens/s of the timed steps.
  * per group: predicted = `predicted_s` (the group's share of the separable sum), measured =
    `measured_s` (wall time of the group in the instrumented step, including its wait for
    weights). That step samples RSS between groups, so it is slower than a timed step: the
    tables show its sum beside the timed step.
  * ratio = predicted / measured; error = |ratio - 1| (0.5 means off by half; an
    underprediction can be at most 1, an overprediction is unbounded).
  * a group kind is the set of its stages' kinds in order (`attn_norm`, `ffn_norm` and
    `final_norm` count as `norm`), joined by "+"; a group holding a whole layer is `layer`.
  * arithmetic intensity = FLOPs / bytes moved (the plan row's `bytes_moved` from the roofline;
    older plans: weight_bytes + kv_bytes + activation_bytes, what the group holds)
    (the bytes the group holds while it runs: its weights, the KV it reads, its activations);
    achieved FLOP/s = FLOPs / measured seconds. Groups without FLOPs (Llama's `embed`, a row
    gather) have no place on a log axis and are left off the chart (counted in its title).

The device for the chart is a `stagejax.roofline.Device` (the CLI passes
`stagejax.devices.load_device("this_machine")`, the cached calibration). The predictions in the
run directories were made with the device of each run (`metrics["device"]`); the report says
when that differs from the chart's device.

    python experiments/predicted_vs_measured.py RUN_DIR [RUN_DIR ...] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from pathlib import Path
from typing import Callable, Iterable, Sequence

from stagejax_device.results import atomic_write_json, atomic_write_text, csv_text
from stagejax.roofline import Device

# Directories that hold no runs of ours (wandb's files, submitit's pickles, hydra's config copy).
_SKIP_DIRS = {"wandb", ".submitit", ".hydra"}
# The stage kinds of one layer (design §3); a group with all of them is labelled `layer`.
_LAYER_KINDS = {"norm", "q", "k", "v", "attn", "o", "ffn"}
_NORMS = {"attn_norm", "ffn_norm", "final_norm"}
_STAGE_ID = re.compile(r"^(?:L\d+\.)?([a-z_]+)(?:\.\d+)?$")


class RunFilesMissing(FileNotFoundError):
    """A directory given as a run lacks the files the report reads."""


class OldRunFormat(ValueError):
    """A run written before the main job recorded predictions (no `predicted_step_s`)."""


@dataclasses.dataclass
class Run:
    """One finished run: its directory, metrics, plan rows and resolved settings (if present)."""

    run_dir: Path
    metrics: dict
    plan: list[dict]
    settings: dict | None = None
    label: str = ""

    @property
    def schedule(self) -> str:
        return str(self.metrics.get("schedule", "?"))

    @property
    def staged(self) -> bool:
        """Whether the plan has per-group predictions (every schedule but `model`)."""
        return any("predicted_s" in row for row in self.plan)

    @property
    def budget_mb(self) -> float | None:
        return ((self.settings or {}).get("schedule") or {}).get("budget_mb")


# ---- reading runs -------------------------------------------------------------------------------


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); was the run interrupted?") from None


def load_run(run_dir: str | Path) -> Run:
    """The run in `run_dir`. Raises `RunFilesMissing` naming the directory and the missing files,
    `OldRunFormat` for a run written before predictions were recorded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFilesMissing(f"{run_dir} is not a directory: give the run directory of a main-job "
                              f"run (it holds metrics.json and plan.json)")
    missing = [name for name in ("metrics.json", "plan.json") if not (run_dir / name).is_file()]
    if missing:
        raise RunFilesMissing(f"{run_dir} is not a finished run: {' and '.join(missing)} missing "
                              f"(the main job writes metrics.json, plan.json and timeline.json when "
                              f"a run completes; rerun it or drop this directory)")
    metrics = _read_json(run_dir / "metrics.json")
    plan = _read_json(run_dir / "plan.json")
    if not isinstance(metrics, dict) or not isinstance(plan, list):
        raise ValueError(f"{run_dir}: metrics.json must hold an object and plan.json a list of "
                         f"group rows")
    absent = [k for k in ("predicted_step_s", "predicted_pipeline_step_s", "measured_step_s")
              if k not in metrics]
    if absent:
        raise OldRunFormat(f"{run_dir}: metrics.json has no {', '.join(absent)} (written before "
                           f"runs recorded the roofline's predictions); rerun it to include it")
    settings_path = run_dir / "resolved_settings.json"
    settings = _read_json(settings_path) if settings_path.is_file() else None
    return Run(run_dir, metrics, plan, settings)


def expand_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """The given directories; one without metrics.json but with runs below it (a sweep) stands
    for those runs, in natural order. Others are returned as given (`load_run` names what
    they lack)."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir() and not (path / "metrics.json").exists():
            found = [p.parent for p in path.rglob("metrics.json")
                     if not _SKIP_DIRS & set(p.relative_to(path).parts[:-1])]
            if found:
                out += sorted(found, key=_natural_key)
                continue
        out.append(path)
    return out


def _natural_key(path: Path):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def collect_runs(paths: Sequence[str | Path], say: Callable[[str], None] = print) -> list[Run]:
    """Load every run of `paths` (see `expand_run_dirs`). Old-format runs are skipped with a
    message; a directory that is not a run raises `RunFilesMissing`. Labels are the schedule,
    with the budget when one was set, and the directory name where that is still ambiguous."""
    runs = []
    for run_dir in expand_run_dirs(paths):
        try:
            runs.append(load_run(run_dir))
        except OldRunFormat as error:
            say(f"skipping {error}")
    for run in runs:
        budget = run.budget_mb
        run.label = run.schedule + (f"@{budget:g}MB" if budget is not None else "")
    # Still ambiguous: add the directory's name, then (two sweeps' job "0") its whole path.
    for describe in (lambda r: f"{r.label} ({r.run_dir.name})", lambda r: f"{r.schedule} ({r.run_dir})"):
        counts: dict[str, int] = {}
        for run in runs:
            counts[run.label] = counts.get(run.label, 0) + 1
        for run in runs:
            if counts[run.label] > 1:
                run.label = describe(run)
    return runs


# ---- group kinds --------------------------------------------------------------------------------


def stage_kind(stage_id: str) -> str:
    """The report's kind of a stage id (design §3): q, k, v, attn, o, ffn, norm, head, embed."""
    match = _STAGE_ID.match(stage_id)
    if not match:
        raise ValueError(f"{stage_id!r} is not a stage id (design §3: embed, L<i>.q.<h>, ...)")
    kind = match.group(1)
    return "norm" if kind in _NORMS else kind


def group_kind(stage_ids: Sequence[str]) -> str:
    """A group's kind: its stages' kinds in order of appearance joined by "+" (`q`, `attn+o`,
    `norm+head`), or `layer` when it holds every kind of a layer."""
    if not stage_ids:
        raise ValueError("a group has at least one stage")
    kinds = list(dict.fromkeys(stage_kind(s) for s in stage_ids))
    if _LAYER_KINDS <= set(kinds):
        return "layer" if set(kinds) == _LAYER_KINDS else "+".join(
            ["layer"] + [k for k in kinds if k not in _LAYER_KINDS])
    return "+".join(kinds)


# ---- tables -------------------------------------------------------------------------------------


def _ratio(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or not measured > 0 or math.isnan(predicted):
        return None
    return predicted / measured


def _error(ratio: float | None) -> float | None:
    return None if ratio is None else abs(ratio - 1.0)


def error_stats(errors: Iterable[float | None]) -> dict:
    """{"n", "median", "max"} of the errors that exist (None where there are none)."""
    values = [e for e in errors if e is not None]
    if not values:
        return {"n": 0, "median": None, "max": None}
    return {"n": len(values), "median": statistics.median(values), "max": max(values)}


def group_rows(run: Run) -> list[dict]:
    """One row per group of a staged run: kind, bytes, FLOPs, intensity, predicted and measured
    seconds, achieved FLOP/s, ratio and error. Empty for `model` (one row without predictions)."""
    if not run.staged:
        return []
    rows = []
    for plan_row in run.plan:
        missing = [k for k in ("group_id", "stage_ids", "weight_bytes", "kv_bytes",
                               "activation_bytes", "flops", "predicted_s") if k not in plan_row]
        if missing:
            raise ValueError(f"{run.run_dir}/plan.json: group {plan_row.get('group_id', '?')!r} "
                             f"lacks {missing}")
        # The roofline's bytes moved when the run recorded them; older plans: what the group holds.
        bytes_moved = plan_row.get("bytes_moved") or (
            plan_row["weight_bytes"] + plan_row["kv_bytes"] + plan_row["activation_bytes"])
        flops = float(plan_row["flops"])
        measured = plan_row.get("measured_s")
        ratio = _ratio(plan_row["predicted_s"], measured)
        rows.append({
            "run": run.label, "schedule": run.schedule, "group_id": plan_row["group_id"],
            "kind": group_kind(plan_row["stage_ids"]), "n_stages": len(plan_row["stage_ids"]),
            "weight_bytes": plan_row["weight_bytes"], "kv_bytes": plan_row["kv_bytes"],
            "activation_bytes": plan_row["activation_bytes"], "bytes_moved": bytes_moved,
            "flops": flops, "intensity": flops / bytes_moved if bytes_moved else None,
            "predicted_s": plan_row["predicted_s"],
            "predicted_compute_s": plan_row.get("predicted_compute_s"),
            "predicted_load_s": plan_row.get("predicted_load_s"),
            "measured_s": measured,
            "achieved_flops_per_s": flops / measured if measured and flops > 0 else None,
            "ratio": ratio, "error": _error(ratio),
        })
    return rows


def kind_rows(groups: Sequence[dict], run: str | None = None) -> list[dict]:
    """Per group kind (in order of first appearance): count, predicted and measured seconds
    summed, their ratio, and the median and max of the per-group errors. `run` labels the rows
    ("all" when the groups come from several runs)."""
    by_kind: dict[str, list[dict]] = {}
    for row in groups:
        by_kind.setdefault(row["kind"], []).append(row)
    rows = []
    for kind, members in by_kind.items():
        timed = [r for r in members if r["ratio"] is not None]
        predicted = sum(r["predicted_s"] for r in timed)
        measured = sum(r["measured_s"] for r in timed)
        ratio = _ratio(predicted, measured)
        stats = error_stats(r["error"] for r in members)
        rows.append({"run": run if run is not None else members[0]["run"], "kind": kind,
                     "count": len(members), "timed": len(timed),
                     "predicted_s": predicted, "measured_s": measured,
                     "ratio": ratio, "error": _error(ratio),
                     "median_group_error": stats["median"], "max_group_error": stats["max"]})
    return rows


def schedule_row(run: Run, groups: Sequence[dict]) -> dict:
    """One run's step: both predictions against the measured step, the instrumented step's sum
    of per-group seconds, and the per-group error statistics."""
    m = run.metrics
    measured = m.get("measured_step_s")
    ratio = _ratio(m["predicted_step_s"], measured)
    pipeline_ratio = _ratio(m["predicted_pipeline_step_s"], measured)
    instrumented = (sum(r["measured_s"] for r in groups if r["measured_s"] is not None)
                    if groups else None)
    stats = error_stats(r["error"] for r in groups)
    return {"run": run.label, "schedule": run.schedule, "model": m.get("model"),
            "device": m.get("device"), "groups": m.get("n_groups", len(run.plan)),
            "predicted_step_s": m["predicted_step_s"],
            "predicted_pipeline_step_s": m["predicted_pipeline_step_s"],
            "measured_step_s": measured, "ratio": ratio, "error": _error(ratio),
            "pipeline_ratio": pipeline_ratio, "pipeline_error": _error(pipeline_ratio),
            "instrumented_step_s": instrumented, "io_wait_frac": m.get("io_wait_frac"),
            "median_group_error": stats["median"], "max_group_error": stats["max"],
            "run_dir": str(run.run_dir)}


@dataclasses.dataclass
class Report:
    """Everything the report files hold."""

    device: Device
    schedules: list[dict]  # one row per run
    kinds: list[dict]  # per (staged run, kind)
    kinds_all: list[dict]  # per kind over every staged run
    groups: list[dict]  # per group of every staged run
    summary: dict  # error statistics over all runs

    def to_json(self) -> dict:
        return _finite({"device": self.device.to_dict(), "schedules": self.schedules,
                        "kinds": self.kinds, "kinds_all": self.kinds_all, "groups": self.groups,
                        "summary": self.summary})


def _finite(value):
    """NaN and infinities as null: strict JSON readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def build_report(runs: Sequence[Run], device: Device) -> Report:
    """The tables of `runs` (at least one) and the error statistics over them."""
    if not runs:
        raise ValueError("no runs with predictions to report on")
    schedules, kinds, groups = [], [], []
    for run in runs:
        rows = group_rows(run)
        schedules.append(schedule_row(run, rows))
        kinds += kind_rows(rows, run.label) if rows else []
        groups += rows
    kinds_all = kind_rows(groups, "all") if groups else []
    step = error_stats(r["error"] for r in schedules)
    pipeline = error_stats(r["pipeline_error"] for r in schedules)
    per_group = error_stats(r["error"] for r in groups)
    devices = sorted({str(r["device"]) for r in schedules})
    summary = {"runs": len(runs), "staged_runs": sum(1 for r in runs if r.staged),
               "groups": len(groups), "step_error": step, "pipeline_step_error": pipeline,
               "group_error": per_group, "run_devices": devices,
               "untimed_groups": sum(1 for r in groups if r["ratio"] is None)}
    return Report(device, schedules, kinds, kinds_all, groups, summary)


# ---- rendering ----------------------------------------------------------------------------------


def _fmt(value, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value * scale, spec)


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    left = {"run", "schedule", "kind", "device", "model"}
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731 - labels may hold a pipe
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if h in left else "---:" for h in header) + "|"]
    lines += ["| " + " | ".join(cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def schedule_table(report: Report) -> list[dict]:
    return [{"run": r["run"], "groups": r["groups"],
             "pred ms (sum)": _fmt(r["predicted_step_s"], ".3f", 1e3),
             "pred ms (pipeline)": _fmt(r["predicted_pipeline_step_s"], ".3f", 1e3),
             "measured ms/step": _fmt(r["measured_step_s"], ".3f", 1e3),
             "ratio": _fmt(r["ratio"], ".3f"), "error": _fmt(r["error"], ".3f"),
             "ratio (pipeline)": _fmt(r["pipeline_ratio"], ".3f"),
             "error (pipeline)": _fmt(r["pipeline_error"], ".3f"),
             "instrumented ms": _fmt(r["instrumented_step_s"], ".3f", 1e3),
             "I/O wait": _fmt(r["io_wait_frac"], ".1%"),
             "group error median": _fmt(r["median_group_error"], ".3f"),
             "group error max": _fmt(r["max_group_error"], ".3f")}
            for r in report.schedules]


def kind_table(rows: Sequence[dict]) -> list[dict]:
    return [{"kind": r["kind"], "count": r["count"],
             "pred ms": _fmt(r["predicted_s"], ".4f", 1e3),
             "measured ms": _fmt(r["measured_s"], ".4f", 1e3),
             "ratio": _fmt(r["ratio"], ".3f"),
             "median error": _fmt(r["median_group_error"], ".3f"),
             "max error": _fmt(r["max_group_error"], ".3f")} for r in rows]


def _stats_line(name: str, stats: dict) -> str:
    if not stats["n"]:
        return f"- {name}: no measured values"
    return (f"- {name}: median {stats['median']:.3f}, max {stats['max']:.3f} "
            f"(over {stats['n']})")


def error_lines(report: Report) -> list[str]:
    """The error statistics as markdown list items: per schedule (both step predictions), over
    every group, and per group kind over every staged run."""
    s = report.summary
    lines = [_stats_line("step, separable sum, |pred/meas − 1| per schedule", s["step_error"]),
             _stats_line("step, pipeline simulation, per schedule", s["pipeline_step_error"]),
             _stats_line("per group, over every group of every staged run", s["group_error"])]
    for row in report.kinds_all:
        lines.append(_stats_line(f"per group of kind `{row['kind']}`",
                                 {"n": row["timed"], "median": row["median_group_error"],
                                  "max": row["max_group_error"]}))
    if s["untimed_groups"]:
        lines.append(f"- {s['untimed_groups']} groups had no measured seconds and are left out")
    return lines


def render_markdown(report: Report, images: Sequence[str] = ()) -> str:
    d, s = report.device, report.summary
    lines = ["# Roofline: predicted vs measured decode latency", "",
             f"Chart device: `{d.name}` — {d.source}. Runs predicted with: "
             f"{', '.join(f'`{x}`' for x in s['run_devices'])}."
             + ("" if s["run_devices"] == [d.name] else
                " (differs from the chart's device: the predictions are for that device.)"),
             "", "ratio = predicted / measured, error = |ratio − 1|. Step: measured = 1 / decode "
             "tokens/s of the timed steps; `pred ms (sum)` is the planner's separable sum, "
             "`pred ms (pipeline)` the roofline's prefetch-pipeline simulation. Groups: measured = "
             "the group's seconds in one instrumented step (it samples RSS between groups; its sum "
             "is `instrumented ms`).", "", "## Per schedule", "",
             markdown_table(schedule_table(report)), "", "## Error statistics", "",
             *error_lines(report)]
    if report.kinds_all:
        lines += ["", "## Per group kind, all staged runs", "", markdown_table(kind_table(report.kinds_all))]
    for label in dict.fromkeys(r["run"] for r in report.kinds):
        rows = [r for r in report.kinds if r["run"] == label]
        lines += ["", f"## Per group kind: {label}", "", markdown_table(kind_table(rows))]
    if images:
        lines += ["", "## Charts", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in images]
    return "\n".join(lines) + "\n"


# ---- charts -------------------------------------------------------------------------------------


def _kind_colors(report: Report) -> dict[str, tuple]:
    """One colour per group kind of the whole report, so both charts agree."""
    from matplotlib import colormaps

    kinds = list(dict.fromkeys(r["kind"] for r in report.groups))
    if len(kinds) <= 10:
        palette = colormaps["tab10"]
        return {k: palette(i) for i, k in enumerate(kinds)}
    # tab20 pairs a dark and a light shade: all dark ones first, so the first ten stay distinct.
    palette = colormaps["tab20"]
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {k: palette(order[i % 20]) for i, k in enumerate(kinds)}


_MARKERS = "osD^vP*Xh<>p"


def roofline_figure(report: Report):
    """Achieved FLOP/s against arithmetic intensity per group, with the device's roofline."""
    from matplotlib.figure import Figure

    d = report.device
    points = [r for r in report.groups if r["intensity"] and r["achieved_flops_per_s"]]
    fig = Figure(figsize=(10.5, 6.5))
    ax = fig.add_subplot()
    peak = d.peak_flops("float32")
    ridge = peak / d.mem_read_bytes_per_s
    xs = [r["intensity"] for r in points] or [ridge]
    lo, hi = min(min(xs), ridge) / 3, max(max(xs), ridge) * 3
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(peak, x * d.mem_read_bytes_per_s) for x in grid], color="black", lw=2,
            label=f"roofline: memory {d.mem_read_bytes_per_s / 1e9:.1f} GB/s, "
                  f"float32 peak {peak / 1e9:.0f} GFLOP/s")
    if d.matvec_bytes_per_s:
        ax.plot(grid, [min(peak, x * d.matvec_bytes_per_s) for x in grid], color="0.35", ls="--",
                label=f"batch-1 matvec weight rate {d.matvec_bytes_per_s / 1e9:.1f} GB/s")
    ax.plot(grid, [min(peak, x * d.storage_warm_bytes_per_s) for x in grid], color="0.5", ls=":",
            label=f"streamed weights: storage-warm copy {d.storage_warm_bytes_per_s / 1e9:.1f} GB/s")
    colors = _kind_colors(report)
    kinds = [k for k in colors if any(r["kind"] == k for r in points)]
    runs = list(dict.fromkeys(r["run"] for r in points))
    for ri, run in enumerate(runs):
        for kind in kinds:
            sel = [r for r in points if r["run"] == run and r["kind"] == kind]
            if sel:
                ax.scatter([r["intensity"] for r in sel], [r["achieved_flops_per_s"] for r in sel],
                           s=16, alpha=0.7, color=colors[kind], marker=_MARKERS[ri % len(_MARKERS)],
                           edgecolors="none")
    _legend_kinds_runs(ax, {k: colors[k] for k in kinds}, runs)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs / bytes of weights + KV + activations)")
    ax.set_ylabel("achieved FLOP/s (FLOPs / measured seconds)")
    left_off = len(report.groups) - len(points)
    ax.set_title(f"Groups on the roofline of {d.name} ({len(points)} groups"
                 + (f"; {left_off} without FLOPs or timing left off" if left_off else "") + ")",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    return fig


def _legend_kinds_runs(ax, colors: dict, runs: Sequence[str]) -> None:
    """Colour = group kind, marker = run, as two legends beside the lines' legend."""
    from matplotlib.lines import Line2D

    lines_legend = ax.legend(loc="upper left", fontsize=7)
    ax.add_artist(lines_legend)
    handles = [Line2D([], [], ls="", marker="o", color=c, label=k) for k, c in colors.items()]
    handles += [Line2D([], [], ls="", marker=_MARKERS[i % len(_MARKERS)], color="0.3", label=r)
                for i, r in enumerate(runs)]
    # Outside the axes: points fill the corners a legend inside would take.
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7,
              title="kind (colour), run (marker)", title_fontsize=7)


def scatter_figure(report: Report):
    """Predicted against measured seconds per group, log-log, with y = x (and ×10 bands)."""
    from matplotlib.figure import Figure

    points = [r for r in report.groups if r["ratio"] is not None and r["predicted_s"] > 0]
    fig = Figure(figsize=(9, 6.5))
    ax = fig.add_subplot()
    values = [r["measured_s"] for r in points] + [r["predicted_s"] for r in points] or [1e-6, 1e-3]
    lo, hi = min(values) / 2, max(values) * 2
    ax.plot([lo, hi], [lo, hi], color="black", lw=1.2, label="predicted = measured")
    ax.plot([lo, hi], [lo / 10, hi / 10], color="0.6", lw=0.8, ls=":", label="×10 / ÷10")
    ax.plot([lo, hi], [lo * 10, hi * 10], color="0.6", lw=0.8, ls=":")
    colors = _kind_colors(report)
    kinds = [k for k in colors if any(r["kind"] == k for r in points)]
    runs = list(dict.fromkeys(r["run"] for r in points))
    for ri, run in enumerate(runs):
        for kind in kinds:
            sel = [r for r in points if r["run"] == run and r["kind"] == kind]
            if sel:
                ax.scatter([r["measured_s"] for r in sel], [r["predicted_s"] for r in sel], s=16,
                           alpha=0.7, color=colors[kind], marker=_MARKERS[ri % len(_MARKERS)],
                           edgecolors="none")
    _legend_kinds_runs(ax, {k: colors[k] for k in kinds}, runs)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured seconds (instrumented decode step)")
    ax.set_ylabel("predicted seconds (roofline, planner's per-group share)")
    stats = report.summary["group_error"]
    ax.set_title(f"Per group, {len(points)} groups: |pred/meas − 1| median "
                 f"{_fmt(stats['median'], '.2f')}, max {_fmt(stats['max'], '.2f')}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)  # atomic like the JSON results: a viewer never sees half a PNG
    return path


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write the markdown, CSVs, JSON and (when there are staged runs) the two charts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    images = []
    if report.groups:
        paths["roofline"] = _save(roofline_figure(report), out / "roofline.png")
        paths["scatter"] = _save(scatter_figure(report), out / "predicted_vs_measured.png")
        images = [paths["roofline"], paths["scatter"]]
    paths["markdown"] = atomic_write_text(out / "predicted_vs_measured.md",
                                          render_markdown(report, [str(p) for p in images]))
    paths["schedules_csv"] = atomic_write_text(out / "schedules.csv", csv_text(report.schedules))
    paths["kinds_csv"] = atomic_write_text(out / "kinds.csv", csv_text(report.kinds_all + report.kinds))
    paths["groups_csv"] = atomic_write_text(out / "groups.csv", csv_text(report.groups))
    paths["json"] = atomic_write_json(out / "predicted_vs_measured.json", report.to_json())
    return paths
