"""The main job end to end on the tiny model, through hydra, and atomic result files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stagejax_device.results import atomic_write_json

REPO = Path(__file__).resolve().parents[1]

REQUIRED_METRICS = {
    "model", "schedule", "quant", "cache", "baseline_rss_bytes", "peak_rss_bytes",
    "peak_rss_decode_bytes", "compile_s", "decode_tokens_per_s", "prefill_tokens_per_s",
    "time_to_first_token_s", "ppl", "ppl_stderr", "ppl_chunks", "n_ctx", "generated_text",
}


def test_main_job_on_tiny_model_writes_metrics(tmp_path):
    run_dir = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, "-m", "stagejax.run", "model=tiny", "eval.ppl_chunks=2",
         "decode.max_new_tokens=5", "tracking.mode=disabled", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert REQUIRED_METRICS <= set(metrics)
    # eval.n_ctx unset: 512, shortened to the tiny model's context of 97 tokens
    assert metrics["model"] == "tiny" and metrics["ppl_chunks"] == 2 and metrics["n_ctx"] == 97
    assert metrics["ppl_text_mode"] == "bytes"
    assert metrics["generated_tokens"] == 5
    assert metrics["peak_rss_bytes"] >= metrics["baseline_rss_bytes"] > 0
    assert 1 < metrics["ppl"] < 1e4
    assert "perplexity" in completed.stdout and "tokens/s" in completed.stdout
    assert not list(run_dir.glob(".*.tmp"))
    # plan.json: the compiled executables' XLA temporaries beside the plan's bound of them
    plan = json.loads((run_dir / "plan.json").read_text())
    assert all(row["compiled_scratch_bytes"] <= row["scratch_bytes"] for row in plan)
    assert any(row["compiled_scratch_bytes"] > 0 for row in plan)


def test_bad_override_fails_before_loading(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "stagejax.run", "model=tiny", "eval.n_ctx=-3",
         f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert "eval.n_ctx must be a positive number" in completed.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"a": 1})

    class Unserializable:
        pass

    with pytest.raises(TypeError):
        atomic_write_json(target, {"a": Unserializable()})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize("in_helper", [True, False])
def test_a_model_the_cache_lacks_is_converted_in_a_helper_process(tmp_path, monkeypatch, in_helper):
    """A first run converts in a child process (reading the source leaves heap behind, which
    would sit in the run's baseline) and then only opens the checkpoint; with
    `convert_in_helper=false` it converts in its own process."""
    from stagejax import experiment
    from stagejax.settings import ModelSettings, PathSettings, RunSettings

    settings = RunSettings(model=ModelSettings(name="tiny"), paths=PathSettings(cache=str(tmp_path)),
                           convert_in_helper=in_helper)
    in_process = []
    convert = experiment.convert_checkpoint
    monkeypatch.setattr(experiment, "convert_checkpoint",
                        lambda *args, **kwargs: in_process.append(args) or convert(*args, **kwargs))
    prepared = experiment._prepare(settings, progress=False)
    prepared[5].close()  # the opened WeightStore
    assert len(in_process) == (0 if in_helper else 1)
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1
    again = experiment._prepare(settings, progress=False)  # cached: nobody converts
    again[5].close()
    assert len(in_process) == (0 if in_helper else 1)
