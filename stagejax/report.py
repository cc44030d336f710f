"""Reports over finished runs: a sweep (or any results directory) → table, CSV and plots.

Finds every run directory below a root (a directory holding `metrics.json`, design §7, as
written by `stagejax.experiment`, with its `plan.json` and `timeline.json` beside it) and
writes into the root (or `--out`):

  - `report.md`: one row per run — stages, groups, the decode peak of the whole process, the
    runtime baseline, the working set above it and the plan's prediction of it, tokens/s, time
    to first token, I/O wait, bytes streamed per token, perplexity — with the runs on the
    memory/speed Pareto front (whole-process decode peak vs tokens/s) marked;
  - `report.csv`: every scalar metric of every run;
  - `pareto.png`: the whole process's decode peak RSS against decode tokens/s, one colour per
    schedule, the Pareto front (no other run both faster and smaller) drawn;
  - `timeline.png`: each run's memory across the groups of one decode step (RSS after the
    group, its high-water mark while it ran, live JAX bytes, the plan's prediction);
  - `trace.json`: one run's decode step as a Chrome/Perfetto trace (`stagejax.trace`).

Runs are labelled by the hydra overrides that differ between them (`.hydra/overrides.yaml`),
else by their path below the root. Metrics files of either schema are read: before schema 2
the decode peak was stored only above the baseline (`peak_rss_decode_bytes`). Memory is in MiB.

    python -m stagejax.report multirun/2026-11-21/10-00-00.000000
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import re
from pathlib import Path
from typing import Sequence

from stagejax_device.results import atomic_write_json, atomic_write_text
from stagejax.trace import chrome_trace, split_timeline

MB = 2**20
# Directories that hold no runs of ours (wandb's files, submitit's pickles, hydra's config copy).
_SKIP_DIRS = {"wandb", ".submitit", ".hydra"}


@dataclasses.dataclass
class RunResult:
    """One finished run: its directory and the files the main job wrote there."""

    run_dir: Path
    metrics: dict
    plan: list | None = None
    groups: list | None = None  # per-group timeline records
    loads: list | None = None
    overrides: list[str] = dataclasses.field(default_factory=list)
    label: str = ""
    job: dict | None = None  # job.json: how hydra ran it (launcher, process reuse)

    @property
    def working_set_bytes(self) -> float | None:
        """The decode's high-water RSS above the runtime baseline (schema 1: its only figure)."""
        m = self.metrics
        return m.get("decode_working_set_bytes", m.get("peak_rss_decode_bytes"))

    @property
    def decode_peak_bytes(self) -> float | None:
        """The whole process's high-water RSS while decoding (design §7's headline)."""
        m = self.metrics
        if m.get("decode_peak_rss_bytes") is not None:
            return m["decode_peak_rss_bytes"]
        if self.working_set_bytes is None or m.get("baseline_rss_bytes") is None:
            return None
        return self.working_set_bytes + m["baseline_rss_bytes"]

    @property
    def tokens_per_s(self) -> float | None:
        return self.metrics.get("decode_tokens_per_s")


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every directory below `root` (or `root` itself) holding a metrics.json, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory: give a sweep or results directory")
    dirs = [p.parent for p in root.rglob("metrics.json")
            if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(dirs, key=_natural_key)


def _natural_key(path: Path):
    """Sort job directories 0, 1, 2, ..., 10 rather than 0, 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    import yaml  # PyYAML, already a dependency of hydra's omegaconf

    overrides = yaml.safe_load(path.read_text()) or []
    return [str(o) for o in overrides]


def load_run(run_dir: str | Path) -> RunResult:
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir / "metrics.json")
    if not isinstance(metrics, dict):
        raise ValueError(f"{run_dir / 'metrics.json'} is not a JSON object")
    timeline = _read_json(run_dir / "timeline.json")
    groups, loads = split_timeline(timeline) if timeline is not None else (None, None)
    return RunResult(run_dir, metrics, _read_json(run_dir / "plan.json"), groups, loads,
                     _read_overrides(run_dir), job=_read_json(run_dir / "job.json"))


def load_runs(root: str | Path, progress: bool = True) -> list[RunResult]:
    """Every run below `root`, labelled by what differs between them."""
    from tqdm import tqdm

    root = Path(root)
    dirs = find_run_dirs(root)
    if not dirs:
        raise FileNotFoundError(f"no metrics.json below {root}: nothing to report "
                                "(did the runs finish? each job writes metrics.json last)")
    runs = [load_run(d) for d in tqdm(dirs, desc="reading runs", unit="run", disable=not progress or None)]
    _assign_labels(runs, root)
    return runs


def _assign_labels(runs: list[RunResult], root: Path) -> None:
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    for run in runs:
        differing = [o for o in run.overrides if o not in common]
        relative = run.run_dir.relative_to(root).as_posix() if run.run_dir != root else run.run_dir.name
        run.label = " ".join(differing) or relative
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.label] = seen.get(run.label, 0) + 1
    for run in runs:  # identical overrides (e.g. repeats): tell them apart by directory
        if seen[run.label] > 1:
            run.label = f"{run.label} [{run.run_dir.relative_to(root).as_posix()}]"


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For (tokens/s, peak bytes) points: True where no other point is at least as fast and
    at most as large, and strictly better in one. Points missing a value are never on it."""
    on_front = []
    for i, (speed, peak) in enumerate(points):
        if speed is None or peak is None:
            on_front.append(False)
            continue
        dominated = any(
            j != i and s is not None and p is not None and s >= speed and p <= peak
            and (s > speed or p < peak)
            for j, (s, p) in enumerate(points))
        on_front.append(not dominated)
    return on_front


def _front(runs: Sequence[RunResult]) -> list[bool]:
    return pareto_front([(r.tokens_per_s, r.decode_peak_bytes) for r in runs])


def _mb(value) -> str:
    return "—" if value is None else f"{value / MB:,.1f}"


def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def summary_rows(runs: Sequence[RunResult]) -> list[dict]:
    """The report table: one display row (strings) per run."""
    rows = []
    for run, on_front in zip(runs, _front(runs)):
        m = run.metrics
        ppl = "—" if m.get("ppl") is None else f"{m['ppl']:.4f} ± {m.get('ppl_stderr', float('nan')):.4f}"
        ttft = m.get("time_to_first_token_s")
        rows.append({
            "run": run.label,
            "model": m.get("model", "—"), "schedule": m.get("schedule", "—"),
            "quant": m.get("quant", "—"), "cache": m.get("cache", "—"),
            "stages": _num(m.get("n_stages"), "d"), "groups": _num(m.get("n_groups"), "d"),
            "decode peak MiB": _mb(run.decode_peak_bytes),
            "baseline MiB": _mb(m.get("baseline_rss_bytes")),
            "working set MiB": _mb(run.working_set_bytes),
            "planned MiB": _mb(m.get("planned_peak_bytes")),
            "tokens/s": _num(m.get("decode_tokens_per_s"), ".2f"),
            "TTFT ms": "—" if ttft is None else f"{ttft * 1e3:.1f}",
            "io wait": _num(m.get("io_wait_frac"), ".2f"),
            "MiB streamed/token": _mb(m.get("bytes_streamed_per_token")),
            "PPL": ppl,
            "Pareto": "★" if on_front else "",
        })
    return rows


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    right = {h for h in header if h not in ("run", "model", "schedule", "quant", "cache", "Pareto")}
    cell = lambda v: str(v).replace("|", "\\|")  # noqa: E731 - overrides may hold a pipe
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if h in right else "---" for h in header) + "|"]
    lines += ["| " + " | ".join(cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(runs: Sequence[RunResult]) -> str:
    """Every scalar metric of every run (union of keys; blank where a run lacks one)."""
    keys = sorted({k for r in runs for k, v in r.metrics.items()
                   if isinstance(v, (int, float, str, bool)) or v is None})
    if "generated_text" in keys:  # long free text last, so the numbers line up in a viewer
        keys.remove("generated_text")
        keys.append("generated_text")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run", "run_dir", "pareto"] + keys)
    for run, on_front in zip(runs, _front(runs)):
        writer.writerow([run.label, str(run.run_dir), on_front] + [run.metrics.get(k, "") for k in keys])
    return buffer.getvalue()


# ---- plots ----------------------------------------------------------------------------------


def _schedule_colors(runs: Sequence[RunResult]) -> dict[str, str]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    schedules = sorted({str(r.metrics.get("schedule")) for r in runs})
    return {s: palette(i % 10) for i, s in enumerate(schedules)}


def pareto_figure(runs: Sequence[RunResult]):
    """The whole process's decode peak RSS vs decode tokens/s; the Pareto front highlighted.
    The plan's predicted working set is marked above each run's baseline."""
    from matplotlib.figure import Figure

    colors = _schedule_colors(runs)
    markers = "osD^vP*X"
    quants = sorted({str(r.metrics.get("quant")) for r in runs})
    points = [(r, r.tokens_per_s, r.decode_peak_bytes) for r in runs]
    points = [(r, s, p) for r, s, p in points if s is not None and p is not None]
    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    if not points:
        ax.text(0.5, 0.5, "no run has both decode tokens/s and a decode peak", ha="center",
                transform=ax.transAxes)
        return fig
    floor = 0.01  # MiB: a log axis needs positive values (a metrics file may hold a zero)
    peaks_mb = [max(p / MB, floor) for _, _, p in points]
    log = max(peaks_mb) / min(peaks_mb) > 20
    seen_labels = set()
    for (run, speed, _), peak_mb in zip(points, peaks_mb):
        schedule, quant = str(run.metrics.get("schedule")), str(run.metrics.get("quant"))
        legend = f"{schedule}" + (f" / {quant}" if len(quants) > 1 else "")
        ax.scatter(speed, peak_mb, color=colors[schedule], marker=markers[quants.index(quant) % len(markers)],
                   s=60, zorder=3, label=None if legend in seen_labels else legend)
        seen_labels.add(legend)
        planned, baseline = run.metrics.get("planned_peak_bytes"), run.metrics.get("baseline_rss_bytes")
        if planned is not None and baseline is not None:
            ax.scatter(speed, max((baseline + planned) / MB, floor), color=colors[schedule], marker="_",
                       s=120, alpha=0.6, zorder=2)
        ax.annotate(run.label, (speed, peak_mb), textcoords="offset points", xytext=(6, 4), fontsize=7)
    front = [(s, pm) for ((_, s, _), pm), on in zip(zip(points, peaks_mb),
                                                    pareto_front([(s, p) for _, s, p in points])) if on]
    front.sort()
    ax.plot([s for s, _ in front], [p for _, p in front], "--", color="black", lw=1, zorder=1,
            label="Pareto front (no run both faster and smaller)")
    ax.scatter([s for s, _ in front], [p for _, p in front], s=180, facecolors="none",
               edgecolors="black", zorder=4)
    ax.scatter([], [], color="grey", marker="_", s=120, label="baseline + planned working set")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_ylabel("decode peak RSS of the whole process, MiB (lower is better)")
    ax.set_title("Memory vs speed per run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _layer_ticks(group_ids: Sequence[str], max_ticks: int = 16) -> tuple[list[int], list[str]]:
    """Tick positions at the first group of each layer (and of the head), thinned."""
    ticks, labels, last = [], [], None
    for i, gid in enumerate(group_ids):
        match = re.match(r"L(\d+)\.", gid)
        section = f"L{match.group(1)}" if match else gid.split(".")[0]
        if section != last:
            ticks.append(i)
            labels.append(section)
            last = section
    step = max(1, math.ceil(len(ticks) / max_ticks))
    return ticks[::step], labels[::step]


def _timeline_title(run: RunResult, records: Sequence[dict], baseline: int) -> str:
    schedule = str(run.metrics.get("schedule"))
    name = run.label if run.label == schedule else f"{run.label} ({schedule})"
    return f"{name}: {len(records)} groups, runtime baseline {baseline / MB:,.0f} MB"


def timeline_figure(runs: Sequence[RunResult], max_runs: int = 8):
    """Each run's memory over the groups of one decode step, MB above its runtime baseline."""
    from matplotlib.figure import Figure

    runs = [r for r in runs if r.groups][:max_runs]
    fig = Figure(figsize=(10, 2.6 * max(len(runs), 1) + 0.6), layout="constrained")
    if not runs:
        fig.add_subplot().text(0.5, 0.5, "no timeline.json in these runs", ha="center")
        return fig
    axes = fig.subplots(len(runs), 1, squeeze=False)[:, 0]
    for ax, run in zip(axes, runs):
        baseline = run.metrics.get("baseline_rss_bytes") or 0
        records = run.groups
        x = list(range(len(records)))
        series = [("high-water while running", "peak_rss_bytes", baseline, "-", 1.2),
                  ("RSS after group", "rss_bytes", baseline, "-", 0.8),
                  ("planned peak", "planned_peak_bytes", 0, "--", 1.0),
                  ("live JAX arrays", "live_jax_bytes", 0, ":", 1.0)]
        if len(records) == 1:  # `model`: one executable per step, so one bar per quantity
            present = [(name, (records[0][key] - offset) / MB) for name, key, offset, _, _ in series
                       if key in records[0]]
            ax.barh([n for n, _ in present], [v for _, v in present],
                    color=[f"C{i}" for i in range(len(present))])
            ax.set_xlabel("MB above baseline")
            ax.set_title(_timeline_title(run, records, baseline), fontsize=9)
            ax.grid(True, axis="x", alpha=0.3)
            continue
        for name, key, offset, style, width in series:
            if all(key in rec for rec in records):
                y = [(rec[key] - offset) / MB for rec in records]
                ax.step(x, y, style, where="mid", lw=width, label=name)
        ids = [str(rec.get("group", i)) for i, rec in enumerate(records)]
        ticks, labels = _layer_ticks(ids)
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.set_xlim(-0.5, max(len(records) - 0.5, 0.5))
        ax.set_ylabel("MB above baseline")
        ax.set_title(_timeline_title(run, records, baseline), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("group of one decode step (ticks: first group of each layer)")
    return fig


# ---- files ------------------------------------------------------------------------------------


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)  # atomic like the JSON results: a viewer never sees half a PNG
    return path


def write_run_artifacts(run_dir: str | Path) -> dict[str, Path]:
    """For one finished run: `trace.json` and `timeline.png` beside its timeline.json."""
    run = load_run(run_dir)
    run.label = run.run_dir.name
    written = {}
    if run.groups:
        written["trace"] = atomic_write_json(run.run_dir / "trace.json",
                                             chrome_trace(run.groups, run.loads or (), run.metrics))
        written["timeline_png"] = _save(timeline_figure([run]), run.run_dir / "timeline.png")
    return written


def _pick_trace_run(runs: Sequence[RunResult], wanted: str | None) -> RunResult | None:
    with_timeline = [r for r in runs if r.groups]
    if wanted is not None:
        for run in runs:
            if wanted in (run.label, str(run.run_dir), run.run_dir.name):
                if not run.groups:
                    raise ValueError(f"run {wanted!r} has no timeline.json to trace")
                return run
        raise ValueError(f"no run called {wanted!r}; runs: {', '.join(r.label for r in runs)}")
    # Default: the run with the most groups — the finest-grained step is the one worth viewing.
    return max(with_timeline, key=lambda r: len(r.groups), default=None)


def write_report(root: str | Path, out_dir: str | Path | None = None, trace_run: str | None = None,
                 max_timelines: int = 8, progress: bool = True) -> dict[str, Path]:
    """Write report.md, report.csv, pareto.png, timeline.png and trace.json; return their paths."""
    root = Path(root)
    out_dir = Path(out_dir) if out_dir is not None else root
    runs = load_runs(root, progress)
    rows = summary_rows(runs)
    written = {}
    shared = [r.label for r in runs if r.job and r.job.get("process_job_index")]
    text = "\n".join([
        f"# Runs in {root}",
        "",
        f"{len(runs)} runs. MiB = 2^20 bytes. Decode peak = the whole process's high-water RSS "
        "while decoding (design §7); working set = that minus the runtime baseline (RSS after "
        "imports, compilation and warm-up, before any weight); planned = the plan's prediction "
        "of the working set (design §5). ★ = on the Pareto front of decode peak vs tokens/s "
        "(no other run is both faster and smaller).",
        "",
        markdown_table(rows),
        "",
    ] + ([f"Caution: {', '.join(shared)} ran in a process that had already run other jobs (hydra's "
          "basic launcher runs a sweep in one process), so their memory figures include what "
          "those jobs left behind. For a fresh process per job: hydra/launcher=submitit_local "
          "hydra.sweeper.max_batch_size=1.", ""] if shared else []))
    written["markdown"] = atomic_write_text(out_dir / "report.md", text)
    written["csv"] = atomic_write_text(out_dir / "report.csv", csv_text(runs))
    written["pareto"] = _save(pareto_figure(runs), out_dir / "pareto.png")
    written["timeline"] = _save(timeline_figure(runs, max_timelines), out_dir / "timeline.png")
    chosen = _pick_trace_run(runs, trace_run)
    if chosen is not None:
        written["trace"] = atomic_write_json(
            out_dir / "trace.json", chrome_trace(chosen.groups, chosen.loads or (), chosen.metrics,
                                                 title=chosen.label))
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Turn a sweep or results directory into report.md, report.csv, pareto.png, "
                    "timeline.png and trace.json.")
    parser.add_argument("root", help="a hydra sweep directory, a run directory, or any directory "
                                     "with run directories (holding metrics.json) below it")
    parser.add_argument("--out", help="where to write the report (default: the root)")
    parser.add_argument("--trace-run", help="label or directory of the run to trace "
                                            "(default: the run with the most groups)")
    parser.add_argument("--max-timelines", type=int, default=8, help="runs drawn in timeline.png")
    args = parser.parse_args(argv)
    written = write_report(args.root, args.out, args.trace_run, args.max_timelines)
    print(Path(written["markdown"]).read_text())
    for kind, path in written.items():
        print(f"{kind:>9}: {path}")


if __name__ == "__main__":
    main()
