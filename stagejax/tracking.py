"""Experiment tracking with wandb (the only module that imports it).

`log_run` records one finished run: the resolved settings as the wandb config, every scalar of
metrics.json as the summary, the plan (one row per group: plan.json) and the decode step's
memory timeline (timeline.json) as tables, and the timeline plot (`timeline.png`, drawn by
`stagejax.report`) as an image. Tracking starts after the experiment returns, so wandb's own
threads and its `wandb-core` process never share the measured phases.

Modes (`tracking.mode`): `offline` (default; no network here) writes the run under
`<run dir>/wandb/offline-run-*/`, to be uploaded later with `wandb sync <that dir>`; `online`
syncs while logging (needs `WANDB_API_KEY` or `wandb login`); `disabled` skips wandb.

An offline run keeps its records only in `run-<id>.wandb`, a LevelDB-style log of protobuf
`Record`s (wandb's "datastore" format: a 7-byte header, then 32 KiB blocks of chunks with a
7-byte header each: checksum, length, type FULL/FIRST/MIDDLE/LAST). `read_offline_run` parses
it back (config, summary, logged keys) so a test — or a reader without network — can check
what was logged; wandb 0.31 ships no Python reader for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Iterator

from stagejax.settings import RunSettings

_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, format version
_CHUNK = struct.Struct("<IHB")  # checksum, payload length, chunk type
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _table(rows: list[dict]):
    """A wandb.Table of homogeneous dict rows (columns: the union of keys, in first-seen order)."""
    import wandb

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])


def log_run(settings: RunSettings, metrics: dict, out_dir: str | Path, *, name: str | None = None,
            group: str | None = None, job_type: str | None = None) -> str | None:
    """Log one finished run; returns the wandb run's directory (None when disabled).

    Args:
      out_dir: the run directory: wandb writes under `<out_dir>/wandb`; plan.json,
        timeline.json and timeline.png are read from here when present.
      name, group, job_type: wandb's run name, group (a sweep) and job type (the schedule).
    """
    if settings.tracking.mode == "disabled":
        return None
    import wandb

    out_dir = Path(out_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=settings.tracking.project, mode=settings.tracking.mode, dir=str(out_dir),
        config=dataclasses.asdict(settings), name=name, group=group, job_type=job_type,
        reinit="finish_previous",  # basic-launcher sweeps run several jobs in one process
        # The measured run is over: sampling system metrics now would describe only the upload,
        # and wandb's console capture would duplicate hydra's log.
        settings=wandb.Settings(x_disable_stats=True, console="off"))
    try:
        run.summary.update({k: v for k, v in metrics.items()
                            if isinstance(v, (int, float, str, bool))})
        logged = {}
        plan = _read_json(out_dir / "plan.json")
        if plan:
            logged["plan"] = _table(plan)
        timeline = _read_json(out_dir / "timeline.json")
        if timeline:
            from stagejax.trace import split_timeline

            groups, loads = split_timeline(timeline)
            logged["timeline"] = _table(groups)
            if loads:
                logged["loads"] = _table(loads)
        png = out_dir / "timeline.png"
        if png.exists():
            logged["memory_timeline"] = wandb.Image(str(png), caption="memory over one decode step")
        if logged:
            run.log(logged)
        return str(Path(run.dir).parent)  # run.dir is its files/ directory
    finally:
        run.finish()


# ---- reading an offline run back --------------------------------------------------------------


def log_history(settings, history: list[dict], metrics: dict, out_dir: str | Path, *,
                step_key: str = "step", name: str | None = None, group: str | None = None,
                job_type: str | None = None) -> str | None:
    """Log a finished training run: each history row at its step (None values dropped), then
    every scalar of `metrics` as the summary. Returns the wandb run directory (None if disabled)."""
    if settings.tracking.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=settings.tracking.project, mode=settings.tracking.mode,
                     dir=str(out_dir), config=dataclasses.asdict(settings), name=name,
                     group=group, job_type=job_type, reinit="finish_previous",
                     settings=wandb.Settings(x_disable_stats=True, console="off"))
    try:
        for row in history:
            run.log({k: v for k, v in row.items() if k != step_key and v is not None},
                    step=int(row[step_key]))
        run.summary.update({k: v for k, v in metrics.items()
                            if isinstance(v, (int, float, str, bool))})
        return str(Path(run.dir).parent)
    finally:
        run.finish()


def find_offline_runs(out_dir: str | Path) -> list[Path]:
    """The offline wandb run directories below a run directory (`wandb/offline-run-*`)."""
    return sorted(Path(out_dir).glob("wandb/offline-run-*"))


def wandb_records(path: str | Path) -> Iterator:
    """The protobuf `Record`s of a `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"{path} is too short to be a .wandb file")
    ident, magic, version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a .wandb file (header {data[:7]!r})")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK.size:  # too small for a chunk header: zero padding
            pos += left_in_block
            continue
        _, length, kind = _CHUNK.unpack_from(data, pos)
        if kind == 0 and length == 0:  # zero-filled tail of a block
            pos += left_in_block
            continue
        payload = data[pos + _CHUNK.size:pos + _CHUNK.size + length]
        pos += _CHUNK.size + length
        if kind == _FULL:
            pending = payload
        elif kind == _FIRST:
            pending = payload
            continue
        elif kind == _MIDDLE:
            pending += payload
            continue
        elif kind == _LAST:
            pending += payload
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        yield record


@dataclasses.dataclass
class OfflineRun:
    """What an offline wandb run recorded."""

    path: Path
    run_id: str
    config: dict
    summary: dict  # user keys only (wandb's own `_`-prefixed ones dropped)
    logged_keys: list[str]  # keys passed to run.log (tables, images)


def read_offline_run(run_dir: str | Path) -> OfflineRun:
    """Parse an `offline-run-*` directory's `.wandb` file."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_dir}")
    config, summary, logged, run_id = {}, {}, [], ""
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                if item.key and not item.key.startswith("_"):
                    summary[item.key] = json.loads(item.value_json)
        elif kind == "history":
            for item in record.history.item:
                key = item.key or (item.nested_key[0] if item.nested_key else "")
                if key and not key.startswith("_") and key not in logged:
                    logged.append(key)
    config.pop("_wandb", None)
    return OfflineRun(run_dir, run_id, config, summary, logged)
