"""The predicted-vs-measured report: group kinds, the tables' arithmetic on synthetic run
directories, clear errors for directories that are not runs, and one real tiny-model run of the
main job read back by the CLI."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from stagejax import roofline_report as rr
from stagejax.roofline import Device

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "predicted_vs_measured.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

DEVICE = Device(name="test_board", flops_per_s={"float32": 1e11}, mem_read_bytes_per_s=2e10,
                storage_read_bytes_per_s=1e9, storage_warm_bytes_per_s=1e10,
                call_overhead_s=1e-5, ram_bytes=8e9, source="made up for a test",
                matvec_bytes_per_s=1.5e10)


def plan_row(group_id, stage_ids, predicted_s, measured_s, flops=1000.0, weight=600, kv=200, act=200):
    return {"group_id": group_id, "kind": "fused", "stage_ids": stage_ids, "n_stages": len(stage_ids),
            "weight_bytes": weight, "kv_bytes": kv, "activation_bytes": act, "flops": flops,
            "prefetch_bytes": 0, "buffer_bytes": 0, "peak_bytes": weight + kv + act,
            "predicted_s": predicted_s, "predicted_compute_s": predicted_s,
            "predicted_load_s": predicted_s / 2, "measured_s": measured_s}


def write_run(path: Path, schedule, plan, predicted=0.002, pipeline=0.0025, measured=0.004,
              budget_mb=None, old=False):
    path.mkdir(parents=True)
    metrics = {"model": "tiny", "schedule": schedule, "n_groups": len(plan), "io_wait_frac": 0.1,
               "decode_tokens_per_s": 1 / measured, "device": "test_board"}
    if not old:
        metrics |= {"predicted_step_s": predicted, "predicted_pipeline_step_s": pipeline,
                    "measured_step_s": measured}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "plan.json").write_text(json.dumps(plan))
    (path / "resolved_settings.json").write_text(json.dumps({"schedule": {"budget_mb": budget_mb}}))
    return path


def atomic_plan():
    # ratios 0.5, 2.0, 1.0, 0.25 (the attn group: 4 stages of one kind)
    return [plan_row("embed", ["embed"], 1e-5, 2e-5, flops=0.0),
            plan_row("L0.q.0", ["L0.q.0"], 2e-5, 1e-5),
            plan_row("L0.q.1", ["L0.q.1"], 1e-5, 1e-5, flops=4000.0, weight=500, kv=0, act=500),
            plan_row("L0.attn.0..L0.attn.3", [f"L0.attn.{h}" for h in range(4)], 1e-5, 4e-5)]


def test_group_kinds_follow_the_stage_kinds():
    assert rr.group_kind(["L3.q.0", "L3.q.1"]) == "q"
    assert rr.group_kind(["L0.attn_norm"]) == rr.group_kind(["final_norm"]) == "norm"
    assert rr.group_kind(["final_norm", "head.0", "head.1"]) == "norm+head"
    assert rr.group_kind(["L1.attn.0", "L1.o", "L1.ffn_norm", "L1.ffn.0"]) == "attn+o+norm+ffn"
    layer = ["L2.attn_norm", "L2.q.0", "L2.k.0", "L2.v.0", "L2.attn.0", "L2.o", "L2.ffn_norm",
             "L2.ffn.0", "L2.ffn.1"]
    assert rr.group_kind(layer) == "layer"
    assert rr.group_kind(["embed"]) == "embed"
    with pytest.raises(ValueError, match="not a stage id"):
        rr.group_kind(["L0/q/0"])


def test_tables_of_synthetic_runs(tmp_path):
    messages = []
    write_run(tmp_path / "a", "atomic", atomic_plan())
    write_run(tmp_path / "b", "budget", [plan_row("L0.q.0..L0.v.0", ["L0.q.0", "L0.k.0", "L0.v.0"],
                                                  3e-5, 1e-5)], budget_mb=2.5)
    write_run(tmp_path / "m", "model", [{"group_id": "model", "kind": "fused", "weight_bytes": 1,
                                         "kv_bytes": 0, "activation_bytes": 0}],
              predicted=0.001, pipeline=0.001, measured=0.001)
    write_run(tmp_path / "old", "op", atomic_plan(), old=True)
    runs = rr.collect_runs([tmp_path / "a", tmp_path / "b", tmp_path / "m", tmp_path / "old"],
                           say=messages.append)
    assert [r.label for r in runs] == ["atomic", "budget@2.5MB", "model"]
    assert len(messages) == 1 and "old" in messages[0] and "predicted_step_s" in messages[0]

    report = rr.build_report(runs, DEVICE)
    atomic, budget, model = report.schedules
    assert atomic["ratio"] == pytest.approx(0.5) and atomic["error"] == pytest.approx(0.5)
    assert atomic["pipeline_ratio"] == pytest.approx(0.625)
    assert atomic["instrumented_step_s"] == pytest.approx(8e-5)
    assert atomic["median_group_error"] == pytest.approx(0.625)  # errors 0.5, 1, 0, 0.75
    assert atomic["max_group_error"] == pytest.approx(1.0)
    assert model["error"] == pytest.approx(0.0) and model["median_group_error"] is None

    groups = {g["group_id"]: g for g in report.groups}
    assert groups["L0.q.1"]["intensity"] == pytest.approx(4000 / 1000)
    assert groups["L0.q.1"]["achieved_flops_per_s"] == pytest.approx(4000 / 1e-5)
    assert groups["embed"]["achieved_flops_per_s"] is None  # no FLOPs: off the log-log chart
    assert groups["L0.attn.0..L0.attn.3"]["kind"] == "attn"

    q = next(k for k in report.kinds if k["run"] == "atomic" and k["kind"] == "q")
    assert q["count"] == 2 and q["predicted_s"] == pytest.approx(3e-5)
    assert q["ratio"] == pytest.approx(1.5) and q["median_group_error"] == pytest.approx(0.5)
    assert q["max_group_error"] == pytest.approx(1.0)
    assert {k["kind"] for k in report.kinds_all} == {"embed", "q", "attn", "q+k+v"}
    assert report.summary["group_error"] == {"n": 5, "median": pytest.approx(0.75), "max": pytest.approx(2.0)}
    assert report.summary["step_error"]["max"] == pytest.approx(0.5)

    paths = rr.write_report(report, tmp_path / "out")
    for key in ("roofline", "scatter"):
        assert paths[key].read_bytes().startswith(PNG_MAGIC)
    data = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["device"]["name"] == "test_board" and len(data["groups"]) == 5
    with open(paths["groups_csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5 and float(rows[1]["ratio"]) == pytest.approx(2.0)
    markdown = paths["markdown"].read_text()
    assert "## Per group kind: budget@2.5MB" in markdown and "| model |" in markdown
    assert "median 0.750, max 2.000 (over 5)" in markdown
    assert not list((tmp_path / "out").glob(".*.tmp*"))


def test_a_sweep_directory_stands_for_its_runs(tmp_path):
    write_run(tmp_path / "sweep" / "1", "atomic", atomic_plan())
    write_run(tmp_path / "sweep" / "0", "atomic", atomic_plan())
    (tmp_path / "sweep" / "0" / "wandb").mkdir()
    (tmp_path / "sweep" / "0" / "wandb" / "metrics.json").write_text("{}")
    runs = rr.collect_runs([tmp_path / "sweep"])
    assert [r.run_dir.name for r in runs] == ["0", "1"]
    assert [r.label for r in runs] == ["atomic (0)", "atomic (1)"]  # ambiguous: directory added
    write_run(tmp_path / "other" / "0", "atomic", atomic_plan())
    runs = rr.collect_runs([tmp_path / "sweep", tmp_path / "other"])
    assert len({r.label for r in runs}) == 3 and str(tmp_path / "other" / "0") in runs[2].label


def test_directories_that_are_not_runs_are_named(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(rr.RunFilesMissing, match=r"empty.*metrics.json and plan.json missing"):
        rr.load_run(empty)
    half = tmp_path / "half"
    half.mkdir()
    (half / "metrics.json").write_text("{}")
    with pytest.raises(rr.RunFilesMissing, match=r"half.*plan.json missing"):
        rr.load_run(half)
    with pytest.raises(rr.RunFilesMissing, match="not a directory"):
        rr.load_run(tmp_path / "nowhere")
    completed = subprocess.run([sys.executable, str(SCRIPT), str(half), "--out", str(tmp_path / "o")],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert f"{half}" in completed.stderr and "plan.json missing" in completed.stderr
    assert not (tmp_path / "o").exists()


def test_report_of_a_real_tiny_run(tmp_path):
    """The main job's files as written today, read by the CLI (device from a profile file)."""
    run_dir = tmp_path / "layer"
    completed = subprocess.run(
        [sys.executable, "-m", "stagejax.run", "model=tiny", "schedule=layer", "eval.ppl_chunks=0",
         "decode.max_new_tokens=4", "tracking.mode=disabled", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    profile = tmp_path / "board.yaml"
    profile.write_text(json.dumps(DEVICE.to_dict()))  # JSON is YAML
    out = tmp_path / "report"
    completed = subprocess.run([sys.executable, str(SCRIPT), str(run_dir), "--out", str(out),
                                "--device", str(profile)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "| layer |" in completed.stdout and "per group" in completed.stdout
    report = json.loads((out / "predicted_vs_measured.json").read_text())
    (row,) = report["schedules"]
    assert row["schedule"] == "layer" and row["groups"] == 5
    assert row["measured_step_s"] > 0 and row["predicted_step_s"] > 0
    assert math.isclose(row["ratio"], row["predicted_step_s"] / row["measured_step_s"])
    kinds = [k["kind"] for k in report["kinds_all"]]
    assert kinds == ["embed", "layer", "norm+head"]
    assert all(g["measured_s"] > 0 for g in report["groups"])
    assert (out / "roofline.png").read_bytes().startswith(PNG_MAGIC)
