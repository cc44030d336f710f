"""`python -m stagejax.run` (or `stagejax-run`): the hydra entry point of the main job.

The only module of the package that imports hydra (design §2). It composes `conf/config.yaml`
over the dataclass schemas of `stagejax.settings`, converts it to a plain `RunSettings`, calls
`stagejax.experiment.run_experiment` in hydra's run directory, then adds the run's trace and
timeline plot (`stagejax.report.write_run_artifacts`), a `job.json` (how the job ran), and logs
it to wandb (`stagejax.tracking`). It prints where everything went.

Sweeps: `-m schedule=atomic,op model=tiny` runs one job per combination; hydra's launcher
decides where (`hydra/launcher=joblib` local processes, `submitit_local`, `submitit_slurm`),
and `SweepReport` writes the sweep's report when the last job is done. See docs/harness.md.

Memory cap: `scripts/memcap.py` runs this entry inside a cgroup and passes, in the
`STAGEJAX_MEMCAP` environment variable, which cgroup files to use; the cap (the cgroup's usage
when decoding starts + budget + margin) is applied then and lifted when the experiment returns
(`MemoryCap`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path

# numpy-side BLAS threads fight XLA's for 2 cores (MACHINE_NOTES: ~100x slower matvecs).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # no accelerator here; skip probing for one

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.experimental.callback import Callback  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from stagejax.settings import RunSettings  # noqa: E402

log = logging.getLogger("stagejax")

ConfigStore.instance().store(name="run_schema", node=RunSettings)

MEMCAP_ENV = "STAGEJAX_MEMCAP"
# An absolute path: hydra resolves a relative one against the calling module, which for the
# `stagejax-run` console script is a package lookup (`pkg://conf`) that finds nothing.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# Jobs this process has run. Hydra's basic launcher runs a sweep's jobs one after another in
# one process, so a later job's memory figures include what earlier jobs left behind.
_jobs_in_process = 0


def to_settings(cfg: DictConfig) -> RunSettings:
    """The composed config as typed settings (validated by the dataclasses)."""
    settings = OmegaConf.to_object(cfg)
    assert isinstance(settings, RunSettings), type(settings)
    return settings


def job_info(process_job_index: int) -> dict:
    """How hydra ran this job: mode, launcher, overrides, directories."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "mode": "multirun" if multirun else "run",
        "job_num": hc.job.num if multirun else None,
        "launcher": hc.runtime.choices.get("hydra/launcher"),
        "overrides": list(hc.overrides.task),
        "override_dirname": hc.job.override_dirname,
        "sweep_dir": str(Path(hc.sweep.dir).resolve()) if multirun else None,
        "run_dir": hc.runtime.output_dir,
        "pid": os.getpid(),
        "process_job_index": process_job_index,  # 0: the first job of a fresh process
    }


class MemoryCap:
    """A cgroup memory limit applied when decoding starts, as `scripts/memcap.py` asks.

    The `STAGEJAX_MEMCAP` protocol (a JSON object; paths are cgroup interface files):
      above_bytes: the limit is the cgroup's usage at decode start plus this (budget + margin);
      reclaim_file, reclaim_value: written first, so the kernel drops the page cache charged
        to the job (v1 memory.force_empty, v2 memory.reclaim) and the usage read next is what
        the job itself holds — the runtime baseline as the kernel accounts it;
      usage_file: read for that usage; limit_files / unlimit_files: written with the limit,
        then with `unlimited`, in order (v1: memory before memsw when lowering, memsw first
        when lifting); peak_file, failcnt_files: read afterwards (peak_file reset with
        `peak_reset` when given; charge failures are the failcnt files' sum: charges the
        kernel refused after reclaim, not page cache it reclaimed to stay under the limit).
    The cgroup's usage, not `baseline_rss_bytes`, is the reference: RSS counts pages of shared
    libraries that other processes brought into the page cache (charged to their cgroups), so
    RSS + budget would leave that difference (~140 MB for the tiny model here) as headroom.
    """

    def __init__(self, spec: dict):
        self.spec = spec
        self.record: dict = {}

    @classmethod
    def from_env(cls) -> "MemoryCap | None":
        raw = os.environ.get(MEMCAP_ENV)
        return cls(json.loads(raw)) if raw else None

    @staticmethod
    def _read_int(path: str | None) -> int | None:
        if not path:
            return None
        text = Path(path).read_text().strip()
        return None if text == "max" else int(text.split()[0])

    def apply(self) -> None:
        from stagejax_device import measure

        spec = self.spec
        if spec.get("reclaim_file"):
            try:
                Path(spec["reclaim_file"]).write_text(str(spec["reclaim_value"]))
            except OSError:
                pass  # v2 memory.reclaim reports EAGAIN when it reclaimed less than asked: fine
        usage = self._read_int(spec["usage_file"])
        limit = usage + int(spec["above_bytes"])
        for path in spec["limit_files"]:
            try:
                Path(path).write_text(str(limit))
            except OSError as error:
                raise RuntimeError(
                    f"memcap: cannot set {path} to {limit / 2**20:.1f} MB (cgroup usage "
                    f"{usage / 2**20:.1f} MB): {error}; raise --budget-mb or --margin-mb") from error
        if spec.get("peak_file") and spec.get("peak_reset") is not None:
            Path(spec["peak_file"]).write_text(str(spec["peak_reset"]))
        self.record = {"limit_bytes": limit, "cgroup_usage_at_cap_bytes": usage,
                       "above_bytes": int(spec["above_bytes"]), "rss_at_cap_bytes": measure.rss_bytes(),
                       "applied_at": "decode start"}
        log.info("memcap: limit %.1f MiB = cgroup usage at decode start %.1f MiB + %.1f MiB",
                 limit / 2**20, usage / 2**20, spec["above_bytes"] / 2**20)

    def release(self) -> dict:
        """Read the capped phase's peak and limit hits, then lift the limit."""
        if self.record:
            self.record["cgroup_peak_bytes"] = self._read_int(self.spec.get("peak_file"))
            files = self.spec.get("failcnt_files") or []
            self.record["charge_failures"] = sum(self._read_int(f) or 0 for f in files) if files else None
        for path in self.spec.get("unlimit_files", ()):
            Path(path).write_text(str(self.spec["unlimited"]))
        return self.record


def run_capped(settings: RunSettings, out_dir: str, cap: MemoryCap) -> dict:
    """`run_experiment` with the memory cap applied when the decode phase starts."""
    from stagejax import experiment

    if "on_decode_start" in inspect.signature(experiment.run_experiment).parameters:
        return experiment.run_experiment(settings, out_dir, on_decode_start=lambda *_: cap.apply())
    # run_experiment has no decode-start hook: wrap the generation loop's `before_decode`, which
    # runs between the prefill and the first timed step (right after the RSS mark is reset).
    original = experiment.run_generation

    def run_generation(*args, before_decode=None, **kwargs):
        def start():
            if before_decode is not None:
                before_decode()
            cap.apply()
        return original(*args, before_decode=start, **kwargs)

    experiment.run_generation = run_generation
    try:
        return experiment.run_experiment(settings, out_dir)
    finally:
        experiment.run_generation = original


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> dict:
    global _jobs_in_process
    from stagejax_device.measure import PHASE_FILE, PhaseLog

    # Before the heavy imports: a job killed under a whole-process cap while importing JAX
    # leaves this phase behind.
    PhaseLog(Path(HydraConfig.get().runtime.output_dir) / PHASE_FILE).enter("startup")
    from stagejax.experiment import format_summary, run_experiment
    from stagejax.report import write_run_artifacts
    from stagejax_device.results import atomic_write_json
    from stagejax.tracking import log_run

    settings = to_settings(cfg)
    out_dir = HydraConfig.get().runtime.output_dir
    job = job_info(_jobs_in_process)
    _jobs_in_process += 1
    if job["process_job_index"]:
        log.warning("this process already ran %d job(s): its memory figures include what they "
                    "left behind. For one fresh process per job, sweep with "
                    "hydra/launcher=submitit_local hydra.sweeper.max_batch_size=1",
                    job["process_job_index"])
    cap = MemoryCap.from_env()
    if cap is None:
        metrics = run_experiment(settings, out_dir)
    else:
        try:
            metrics = run_capped(settings, out_dir, cap)
        finally:
            atomic_write_json(Path(out_dir) / "memcap.json", cap.release())
    written = write_run_artifacts(out_dir) if settings.tracking.artifacts else {}
    job["wandb_dir"] = log_run(
        settings, metrics, out_dir, name=job["override_dirname"][:128] or None,
        job_type=settings.schedule.policy,
        # A sweep's jobs share a group named after its directory (e.g. 2026-11-21/10-00-00.000000).
        group="/".join(Path(job["sweep_dir"]).parts[-2:]) if job["sweep_dir"] else None)
    atomic_write_json(Path(out_dir) / "job.json", job)
    print(format_summary(metrics))
    print(f"results: {out_dir}")
    print(f"  metrics.json, plan.json, timeline.json, {''.join(p.name + ', ' for p in written.values())}job.json")
    if job["wandb_dir"]:
        print(f"  wandb ({settings.tracking.mode}): {job['wandb_dir']}"
              + (f"  (upload: wandb sync {job['wandb_dir']})" if settings.tracking.mode == "offline" else ""))
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def export_main(cfg: DictConfig) -> str:
    """`python -m stagejax.export`: the configured plan as a device bundle (`export.*` keys)."""
    from stagejax.export import export_bundle

    out = export_bundle(to_settings(cfg))
    print(f"bundle: {out}\n  run it: stagejax-device {out} --prompt \"...\" --max-new-tokens 32")
    return str(out)


class SweepReport(Callback):
    """At the end of a multirun, write the sweep's report (stagejax.report) into its directory.

    Registered in conf/config.yaml's `hydra.callbacks`. It runs in the launching process after
    every job has returned, whichever launcher ran them; a failure to report does not fail the
    sweep (every job's results are already on disk) and names the command to retry.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            from stagejax.report import write_report

            written = write_report(sweep_dir)
        except Exception as error:  # noqa: BLE001 - reporting is best effort, see above
            log.warning("no sweep report (%s: %s); retry with: python -m stagejax.report %s",
                        type(error).__name__, error, sweep_dir)
            return
        print(f"sweep: {sweep_dir.resolve()}")
        print(f"  report: {written['markdown']}  (also report.csv, pareto.png, timeline.png, trace.json)")


if __name__ == "__main__":
    main()
