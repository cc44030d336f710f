"""Child process for tests/test_memory_metrics.py: one tiny-model run of the main job in a fresh
process, optionally holding a known allocation through the decode phase, with a record of
when executables compile and warm up relative to the baseline.

    python tests/memory_child.py OUT_DIR SCHEDULE HOLD_MIB

Writes OUT_DIR/metrics.json (the job's) and OUT_DIR/child.json: per warm-up call and per XLA
backend compile, the job phase it happened in (read from the run's phase.json, whose "load"
phase begins right after the baseline is measured).
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.monitoring  # noqa: E402
import numpy as np  # noqa: E402

from stagejax import decode, executor, experiment  # noqa: E402
from stagejax_device import measure  # noqa: E402
from stagejax.settings import (DecodeSettings, EvalSettings, ModelSettings, RunSettings,  # noqa: E402
                               ScheduleSettings, TrackingSettings)


def main(out_dir: str, schedule: str, hold_mib: int) -> None:
    out = Path(out_dir)
    events: list[dict] = []

    def phase() -> str | None:
        try:
            return json.loads((out / measure.PHASE_FILE).read_text())["phase"]
        except (OSError, ValueError):
            return None

    def on_compile(name, duration_s, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append({"event": "compile", "phase": phase()})

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    for owner, method in ((decode.MonolithicDecoder, "warm_up"), (executor.StagedDecoder, "dry_run")):
        original = getattr(owner, method)

        def spy(self, *args, _original=original, _name=f"{owner.__name__}.{method}", **kwargs):
            events.append({"event": _name, "phase": phase()})
            return _original(self, *args, **kwargs)

        setattr(owner, method, spy)

    held = []

    def hold(_baseline):
        if hold_mib:
            block = np.ones(hold_mib * 2**20, np.uint8)  # ones: every page touched, resident
            held.append(block)

    settings = RunSettings(model=ModelSettings(name="tiny"), schedule=ScheduleSettings(policy=schedule),
                           decode=DecodeSettings(max_new_tokens=6), eval=EvalSettings(ppl_chunks=0),
                           tracking=TrackingSettings(mode="disabled"))
    experiment.run_experiment(settings, out, progress=False, on_decode_start=hold)
    (out / "child.json").write_text(json.dumps({"events": events, "held_bytes": sum(b.nbytes for b in held)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
