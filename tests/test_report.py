"""Reports and traces: the Pareto front, Chrome/Perfetto trace files, a sweep's report.

Unit tests on synthetic run directories, then one real two-job sweep on the tiny model through
hydra's joblib launcher (each job its own process) whose report the sweep's callback writes.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stagejax.report import find_run_dirs, load_runs, pareto_front, write_report, write_run_artifacts
from stagejax.trace import chrome_trace, split_timeline, write_trace

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REQUIRED_METRICS = {  # design §7
    "model", "schedule", "quant", "cache", "baseline_rss_bytes", "peak_rss_bytes",
    "peak_rss_decode_bytes", "planned_peak_bytes", "n_stages", "n_groups", "decode_tokens_per_s",
    "prefill_tokens_per_s", "time_to_first_token_s", "compile_s", "io_wait_frac",
    "bytes_streamed_per_token", "ppl", "ppl_stderr", "ppl_chunks", "n_ctx", "generated_text",
}


def measured_timeline(n_groups=4):
    groups, t = [], 0.0
    for i in range(n_groups):
        groups.append({"group": f"L0.q.{i}", "start_s": t, "end_s": t + 0.003, "elapsed_s": 0.003,
                       "io_wait_s": 0.001 * (i % 2), "rss_bytes": (300 + i) * MB,
                       "peak_rss_bytes": (301 + i) * MB, "live_jax_bytes": 1000,
                       "planned_peak_bytes": 2 * MB})
        t += 0.0031
    loads = [{"group": f"L0.q.{i}", "start_s": 0.0031 * i - 0.002, "end_s": 0.0031 * i - 0.0005,
              "bytes": 4 * MB} for i in range(1, n_groups)]
    return {"groups": groups, "loads": loads}


def check_trace(trace: dict, group_ids):
    """Structural checks of the Trace Event Format a viewer relies on."""
    trace = json.loads(json.dumps(trace))  # JSON-serialisable, and read back as a viewer would
    events = trace["traceEvents"]
    for event in events:
        assert {"ph", "name", "pid"} <= set(event), event
        if event["ph"] in ("X", "i", "C"):
            assert isinstance(event["ts"], (int, float)) and event["ts"] >= 0, event
        if event["ph"] == "X":
            assert event["dur"] >= 0 and "tid" in event, event
    spans = {e["name"]: e for e in events if e["ph"] == "X" and e.get("cat") == "group"}
    assert set(group_ids) <= set(spans), "every group has a span on the executor track"
    for child in (e for e in events if e["ph"] == "X" and e.get("cat") in ("io", "compute")):
        parent = spans[child["args"]["group"]]
        assert parent["ts"] <= child["ts"] and child["ts"] + child["dur"] <= parent["ts"] + parent["dur"]
    frees = [e["args"]["group"] for e in events if e["ph"] == "i" and e["name"] == "free"]
    assert set(group_ids) <= set(frees)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert "executor" in names
    return events


def test_pareto_front_marks_the_non_dominated_runs():
    points = [(10.0, 5.0), (35.0, 600.0), (9.7, 300.0), (9.9, 320.0), (35.0, 700.0), (None, 1.0),
              (10.0, 5.0)]
    assert pareto_front(points) == [True, True, False, False, False, False, True]


def test_trace_of_a_measured_step_has_every_group_wait_compute_and_loads():
    timeline = measured_timeline()
    groups, loads = split_timeline(timeline)
    trace = chrome_trace(groups, loads, {"baseline_rss_bytes": 300 * MB, "model": "tiny",
                                         "schedule": "atomic"})
    events = check_trace(trace, [g["group"] for g in groups])
    waits = [e for e in events if e["ph"] == "X" and e["name"] == "wait"]
    assert len(waits) == 2 and all(e["dur"] == pytest.approx(1000.0) for e in waits)  # 1 ms in µs
    load_events = [e for e in events if e["ph"] == "X" and e["cat"] == "load"]
    assert len(load_events) == 3 and {e["tid"] for e in load_events} == {2}
    assert load_events[0]["args"]["bytes"] == 4 * MB
    assert min(e["ts"] for e in events if "ts" in e) == 0  # time origin: the earliest event
    counters = [e for e in events if e["ph"] == "C" and e["name"] == "RSS above baseline (MB)"]
    assert counters[-1]["args"]["after group"] == pytest.approx(3.0)
    assert trace["otherData"]["timing"] == "measured"


def test_trace_of_an_older_timeline_is_laid_end_to_end(tmp_path):
    records = [{"group": g, "elapsed_s": 0.002, "rss_bytes": MB, "peak_rss_bytes": MB,
                "live_jax_bytes": 0, "planned_peak_bytes": MB} for g in ("embed", "L0.o", "head.0")]
    (tmp_path / "timeline.json").write_text(json.dumps(records))
    path = write_trace(tmp_path)
    trace = json.loads(path.read_text())
    spans = [e for e in check_trace(trace, ["embed", "L0.o", "head.0"])
             if e["ph"] == "X" and e["cat"] == "group"]
    assert [e["ts"] for e in spans] == pytest.approx([0.0, 2000.0, 4000.0])
    assert trace["otherData"]["timing"] == "reconstructed from elapsed_s"


def test_bad_timelines_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="timeline has none of the keys"):
        split_timeline({"records_v2": []})
    with pytest.raises(ValueError, match="no group records"):
        chrome_trace([], [])
    with pytest.raises(FileNotFoundError, match="timeline.json does not exist"):
        write_trace(tmp_path)


def make_run(root: Path, name: str, overrides, schedule, tokens_per_s, decode_peak_mb, n_groups):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    metrics = {k: 0 for k in REQUIRED_METRICS} | {
        "model": "tiny", "schedule": schedule, "quant": "none", "cache": "ram", "n_groups": n_groups,
        "decode_tokens_per_s": tokens_per_s, "peak_rss_decode_bytes": decode_peak_mb * MB,
        "baseline_rss_bytes": 300 * MB, "planned_peak_bytes": MB, "ppl": 12.5, "ppl_stderr": 0.5,
        "generated_text": "a, \"quoted\" | text"}
    (run / "metrics.json").write_text(json.dumps(metrics))
    timeline = measured_timeline(n_groups)
    (run / "timeline.json").write_text(json.dumps(timeline))
    (run / "plan.json").write_text(json.dumps([{"group_id": g["group"], "peak_bytes": MB}
                                               for g in timeline["groups"]]))
    return run


def test_report_of_a_sweep_directory(tmp_path):
    common = ["model=tiny", "eval.ppl_chunks=1"]
    make_run(tmp_path, "0", common + ["schedule=atomic"], "atomic", 10.0, 5, 7)
    make_run(tmp_path, "1", common + ["schedule=model"], "model", 35.0, 600, 1)
    make_run(tmp_path, "2", common + ["schedule=op"], "op", 9.0, 300, 3)
    (tmp_path / "2" / "job.json").write_text(json.dumps({"process_job_index": 1}))
    (tmp_path / "1" / "wandb" / "x").mkdir(parents=True)  # wandb's files are not runs
    (tmp_path / "1" / "wandb" / "x" / "metrics.json").write_text("{}")
    assert [p.name for p in find_run_dirs(tmp_path)] == ["0", "1", "2"]

    written = write_report(tmp_path, progress=False)
    table = written["markdown"].read_text()
    rows = [line for line in table.splitlines() if line.startswith("| schedule=")]
    assert len(rows) == 3, table  # labelled by the override that differs
    starred = {row.split("|")[1].strip() for row in rows if "★" in row}
    assert starred == {"schedule=atomic", "schedule=model"}
    assert "12.5000 ± 0.5000" in table
    assert "Caution: schedule=op ran in a process that had already run other jobs" in table
    with open(written["csv"]) as handle:
        records = list(csv.DictReader(handle))
    assert [r["schedule"] for r in records] == ["atomic", "model", "op"]
    assert records[0]["generated_text"] == "a, \"quoted\" | text"  # CSV quoting round-trips
    assert list(records[0])[:3] == ["run", "run_dir", "pareto"]
    for kind in ("pareto", "timeline"):
        assert written[kind].read_bytes()[:8] == PNG_MAGIC
    trace = json.loads(written["trace"].read_text())  # default: the run with the most groups
    check_trace(trace, [f"L0.q.{i}" for i in range(7)])


def test_report_of_an_empty_directory_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json below"):
        load_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_runs(tmp_path / "nope")


def test_run_artifacts(tmp_path):
    run = make_run(tmp_path, "run", [], "atomic", 10.0, 5, 5)
    written = write_run_artifacts(run)
    assert written["timeline_png"].read_bytes()[:8] == PNG_MAGIC
    check_trace(json.loads(written["trace"].read_text()), [f"L0.q.{i}" for i in range(5)])


@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    """Two jobs of the tiny model through hydra's joblib launcher (two worker processes)."""
    sweep = tmp_path_factory.mktemp("joblib") / "sweep"
    completed = subprocess.run(
        [sys.executable, "-m", "stagejax.run", "-m", "model=tiny", "schedule=atomic,model",
         "eval.ppl_chunks=1", "eval.n_ctx=16", "decode.max_new_tokens=3", "tracking.mode=disabled",
         "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return sweep, completed


def test_joblib_sweep_writes_two_complete_runs_and_a_report(joblib_sweep):
    sweep, completed = joblib_sweep
    jobs = [json.loads((sweep / j / "job.json").read_text()) for j in ("0", "1")]
    assert {j["launcher"] for j in jobs} == {"joblib"}
    assert all(j["process_job_index"] == 0 for j in jobs)  # a fresh worker process per job
    for j in ("0", "1"):
        metrics = json.loads((sweep / j / "metrics.json").read_text())
        assert REQUIRED_METRICS <= set(metrics), REQUIRED_METRICS - set(metrics)
    table = (sweep / "report.md").read_text()  # written by the SweepReport callback
    assert sum(line.startswith("| schedule=") for line in table.splitlines()) == 2, table
    assert "report.md" in completed.stdout
    atomic = json.loads((sweep / "0" / "metrics.json").read_text())
    groups, _ = split_timeline(json.loads((sweep / "0" / "timeline.json").read_text()))
    assert len(groups) == atomic["n_groups"]
    trace = json.loads((sweep / "0" / "trace.json").read_text())  # written by the run itself
    check_trace(trace, [g["group"] for g in groups])
    assert (sweep / "0" / "timeline.png").read_bytes()[:8] == PNG_MAGIC


def test_report_reads_both_metrics_schemas(tmp_path):
    """Schema 1 stored the decode peak above the baseline only; schema 2 the whole process's."""
    old = make_run(tmp_path, "old", ["schedule=atomic"], "atomic", 10.0, 5, 3)
    new = make_run(tmp_path, "new", ["schedule=model"], "model", 30.0, 600, 1)
    metrics = json.loads((new / "metrics.json").read_text())
    metrics.pop("peak_rss_decode_bytes")
    metrics |= {"schema_version": 2, "decode_peak_rss_bytes": 900 * MB, "decode_working_set_bytes": 600 * MB}
    (new / "metrics.json").write_text(json.dumps(metrics))
    runs = {r.run_dir.name: r for r in load_runs(tmp_path)}
    assert runs["old"].decode_peak_bytes == 305 * MB and runs["old"].working_set_bytes == 5 * MB
    assert runs["new"].decode_peak_bytes == 900 * MB and runs["new"].working_set_bytes == 600 * MB
    table = write_report(tmp_path, progress=False)["markdown"].read_text()
    assert "| decode peak MiB | baseline MiB | working set MiB |" in table
    assert "| 305.0 | 300.0 | 5.0 |" in table and "| 900.0 | 300.0 | 600.0 |" in table
