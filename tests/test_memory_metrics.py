"""Whole-process memory metrics (design §7): the absolute decode peak sees what the decode
holds, the baseline is taken after every schedule's warm-up, and whole-process caps from exec
complete or kill as they should. Each run is a fresh process: memory figures of a process that
ran something before are not a run's own."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stagejax.memcap import COMPLETED, KILLED, CgroupUnavailable, find_memory_cgroup

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def child_run(out_dir: Path, schedule: str, hold_mib: int) -> tuple[dict, dict]:
    completed = subprocess.run(
        [sys.executable, str(REPO / "tests" / "memory_child.py"), str(out_dir), schedule, str(hold_mib)],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return (json.loads((out_dir / "metrics.json").read_text()),
            json.loads((out_dir / "child.json").read_text()))


@pytest.fixture(scope="module")
def model_runs(tmp_path_factory):
    """`model` on the tiny model twice: as is, and holding 32 MiB through its decode; after a
    first run that fills the persistent compilation cache, so both load the same executables."""
    base = tmp_path_factory.mktemp("memory")
    child_run(base / "prime", "model", 0)
    return child_run(base / "plain", "model", 0), child_run(base / "held", "model", 32)


def test_decode_peak_sees_a_known_allocation_and_the_baseline_does_not(model_runs):
    (plain, _), (held, record) = model_runs
    assert record["held_bytes"] == 32 * MIB
    assert plain["schema_version"] == held["schema_version"] == 2
    for metrics in (plain, held):
        assert metrics["decode_working_set_bytes"] == metrics["decode_peak_rss_bytes"] - metrics["baseline_rss_bytes"]
        assert metrics["peak_rss_decode_bytes"] == metrics["decode_working_set_bytes"]  # the alias
        assert metrics["peak_rss_bytes"] >= metrics["decode_peak_rss_bytes"]
        assert 0 < metrics["exec_to_first_token_s"] < metrics["wall_s"] + 60
    grew = held["decode_peak_rss_bytes"] - plain["decode_peak_rss_bytes"]
    assert abs(grew - 32 * MIB) <= 4 * MIB, grew / MIB
    assert abs(held["baseline_rss_bytes"] - plain["baseline_rss_bytes"]) <= 4 * MIB


def warm_up_phases(record: dict) -> tuple[list, list]:
    warm = [e["phase"] for e in record["events"] if e["event"] != "compile"]
    compiled_after = [e for e in record["events"]
                      if e["event"] == "compile" and e["phase"] in ("load", "prefill", "decode")]
    return warm, compiled_after


def test_baseline_is_taken_after_every_schedules_warm_up(model_runs, tmp_path):
    """The "load" phase begins right after the baseline: nothing may warm up or compile there."""
    (_, model_record), _ = model_runs
    _, staged_record = child_run(tmp_path / "layer", "layer", 0)
    for schedule, record, warm_up in (("model", model_record, "MonolithicDecoder.warm_up"),
                                      ("layer", staged_record, "StagedDecoder.dry_run")):
        warm, compiled_after = warm_up_phases(record)
        assert warm and all(phase == "compile" for phase in warm), (schedule, record["events"])
        assert any(e["event"] == warm_up for e in record["events"]), schedule
        assert not compiled_after, (schedule, compiled_after)


def test_memcap_from_start_completes_or_is_killed(tmp_path):
    try:
        find_memory_cgroup()
    except CgroupUnavailable as error:
        pytest.skip(f"no writable cgroup memory controller here: {error}")
    job = ["--", "model=tiny", "schedule=model", "eval.ppl_chunks=0", "decode.max_new_tokens=2",
           "tracking.mode=disabled"]
    reports = {}
    for name, cap_mb in (("generous", 2048), ("below_baseline", 64)):
        out = tmp_path / name
        completed = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "memcap.py"), "--from-start", "--cap-mb", str(cap_mb),
             "--time-limit-s", "300", "--keep-page-cache", "--out", str(out), *job],
            capture_output=True, text=True, timeout=400)
        reports[name] = json.loads((out / "memcap_report.json").read_text())
        reports[name]["exit"] = completed.returncode
    generous, small = reports["generous"], reports["below_baseline"]
    assert generous["status"] == COMPLETED and generous["exit"] == 0, generous
    assert generous["cap_bytes"] == 2048 * MIB and generous["cgroup_removed"]
    # The whole process was charged from exec: its cgroup peak covers its decode-time RSS minus
    # shared-library pages already cached by other processes, so it is far above zero.
    assert 64 * MIB < generous["cgroup_peak_bytes"] <= generous["cap_bytes"]
    assert small["status"] == KILLED and small["exit"] == 1, small
    assert small["cgroup_peak_bytes"] <= 64 * MIB and small["oom_kills"] >= 1
    assert small["page_cache"]["page_cache_dropped"] is False  # --keep-page-cache, recorded


def test_find_min_bisects_to_the_smallest_completing_cap(tmp_path, monkeypatch):
    """The bisection, with probes faked: a job that completes at 300 MiB and above."""
    sys.path.insert(0, str(REPO / "scripts"))
    import memcap

    mib = 2**20
    probed = []

    def fake_probe(python, overrides, cap_bytes, run_dir, time_limit_s, drop_cache=True):
        probed.append(cap_bytes // mib)
        done = cap_bytes >= 300 * mib
        return {"status": COMPLETED if done else KILLED, "cap_bytes": cap_bytes, "phase": None if done else "compile",
                "wall_s": 1.0, "cgroup_peak_bytes": min(cap_bytes, 300 * mib), "page_cache": {"page_cache_dropped": True},
                "decode_tokens_per_s": 2.0 if done else None}

    monkeypatch.setattr(memcap, "capped_probe", fake_probe)
    report = memcap.find_min_cap("python", [], tmp_path, 128 * mib, 1024 * mib, 16 * mib, 10.0)
    assert report["smallest_completing_cap_bytes"] == 304 * mib  # 128 + a multiple of 16
    assert report["largest_failing_cap_bytes"] == 288 * mib
    assert len(probed) == len(set(probed)) <= 9
    summary = memcap.find_min_summary(report, ["--from-start", "--find-min"])
    assert "Smallest cap that completes: 304.0 MiB" in summary and "| 288.0 | killed | compile |" in summary


def test_processes_mapping_finds_another_interpreter_of_this_environment():
    from stagejax.memcap import processes_mapping

    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        import time

        deadline = time.monotonic() + 10
        found = []
        while time.monotonic() < deadline and not found:
            found = [p for p in processes_mapping([sys.base_prefix, sys.prefix]) if p.split()[0] == str(other.pid)]
            time.sleep(0.05)
        assert found
    finally:
        other.communicate(b"")
    assert not [p for p in processes_mapping([sys.prefix]) if p.split()[0] == str(other.pid)]
