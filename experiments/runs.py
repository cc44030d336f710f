"""Running configured jobs for the benchmarks, each in a fresh process.

A benchmark builds `RunSettings` (SmolLM2 defaults: `smollm2_settings`) and calls `run_isolated`,
which pickles them into the job's directory and runs `stagejax.experiment.run_experiment` in a
new Python process, so each job's memory figures (baseline, decode peak) are its own. A job
that fails (an infeasible budget, say) returns {"error": message} instead of metrics.

    python experiments/runs.py <job dir>     # internal: run the pickled settings of one job
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
PROMPT_CHARS = 1820  # ~480 SmolLM2 tokens of WikiText-2 validation text: context ~512 with 32 new


def smollm2_settings(policy: str = "atomic", *, schedule: dict | None = None, cache: dict | None = None,
                     quant: str = "none", new_tokens: int = 32, ppl_chunks: int = 0,
                     prompt_chars: int = PROMPT_CHARS, n_ctx: int = 512):
    """SmolLM2 float32 at context ~512 with KV on disk (the issues' benchmark setting)."""
    from stagejax import data
    from stagejax.settings import (CacheSettings, DecodeSettings, EvalSettings, ModelSettings,
                                   QuantSettings, RunSettings, ScheduleSettings, StoreSettings,
                                   TrackingSettings)

    text = data.read_text("wikitext-2/wiki.valid.tokens")  # the test split is for perplexity
    prompt = text[:prompt_chars]
    if len(text) < prompt_chars:
        raise ValueError(f"the validation text has only {len(text)} characters")
    schedule_args = dict(policy=policy, ffn_chunks=8, vocab_chunk=512, kv_block=512,
                         prefetch_depth=2, prefill_block=64) | (schedule or {})
    return RunSettings(
        model=ModelSettings("smollm2_135m"), schedule=ScheduleSettings(**schedule_args),
        quant=QuantSettings(quant), cache=CacheSettings(**({"kind": "disk"} | (cache or {}))),
        store=StoreSettings(verify="open"),
        eval=EvalSettings(ppl_chunks=ppl_chunks, n_ctx=n_ctx),
        decode=DecodeSettings(prompt=prompt, max_new_tokens=new_tokens),
        tracking=TrackingSettings(mode="disabled"))


def run_isolated(settings, out_dir: str | Path, tree: str | Path | None = None) -> dict:
    """Run one job in a fresh process; its metrics, or {"error": ...} if it failed. `tree`:
    another checkout of the repository (e.g. a git worktree of an earlier revision) whose
    stagejax runs the job instead of this one's."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.pkl").write_bytes(pickle.dumps(settings))
    runner, env = __file__, None
    if tree is not None:
        tree = Path(tree)
        runner = str(tree / "experiments" / "runs.py")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), str(tree / "runtime")]))
    done = subprocess.run([sys.executable, runner, str(out_dir)], capture_output=True, text=True, env=env)
    (out_dir / "settings.pkl").unlink(missing_ok=True)  # resolved_settings.json records them
    metrics = out_dir / "metrics.json"
    if done.returncode != 0:
        lines = [l for l in done.stderr.strip().splitlines() if l.strip()]
        return {"error": lines[-1] if lines else f"exit code {done.returncode}"}
    return json.loads(metrics.read_text())


def _main(out_dir: str) -> None:
    from stagejax.experiment import run_experiment

    settings = pickle.loads((Path(out_dir) / "settings.pkl").read_bytes())
    run_experiment(settings, out_dir, progress=False)


if __name__ == "__main__":
    _main(sys.argv[1])
