"""`python -m stagejax.run`: the hydra entry point of the main job (the only hydra importer).

Composes `conf/config.yaml` over the dataclass schemas of `stagejax.settings`, converts it to a
plain `RunSettings`, and calls `stagejax.experiment.run_experiment` in hydra's run directory.
"""

from __future__ import annotations

import logging
import os

# numpy-side BLAS threads fight XLA's for 2 cores (MACHINE_NOTES: ~100x slower matvecs).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no accelerator here; skip probing for one

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from stagejax.settings import RunSettings

log = logging.getLogger("stagejax")

ConfigStore.instance().store(name="run_schema", node=RunSettings)


def to_settings(cfg: DictConfig) -> RunSettings:
    """The composed config as typed settings (validated by the dataclasses)."""
    settings = OmegaConf.to_object(cfg)
    assert isinstance(settings, RunSettings), type(settings)
    return settings


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    from stagejax.experiment import format_summary, run_experiment
    from stagejax.tracking import log_run

    settings = to_settings(cfg)
    out_dir = HydraConfig.get().runtime.output_dir
    metrics = run_experiment(settings, out_dir)
    log_run(settings, metrics, out_dir)
    print(format_summary(metrics))
    print(f"metrics: {os.path.join(out_dir, 'metrics.json')}")
    return metrics


if __name__ == "__main__":
    main()
