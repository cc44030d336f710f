"""Experiment tracking with wandb (the only module that imports it).

Offline by default (no network here): the run is written under `<run dir>/wandb` and can be
synced later with `wandb sync`. `tracking.mode=disabled` skips wandb entirely.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from stagejax.settings import RunSettings


def log_run(settings: RunSettings, metrics: dict, out_dir: str | Path) -> str | None:
    """Log the config and summary metrics of one run; returns the wandb run directory."""
    if settings.tracking.mode == "disabled":
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=settings.tracking.project, mode=settings.tracking.mode,
                     dir=str(out_dir), config=dataclasses.asdict(settings), reinit="finish_previous")
    try:
        run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        return run.dir
    finally:
        run.finish()
