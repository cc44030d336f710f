"""The race's bookkeeping (rounds, skips, medians, files), with capped runs faked: the real runs
need llama.cpp, cgroups and minutes (experiments/race_memory.py)."""

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))

import race_memory  # noqa: E402


def test_race_tables_every_round_and_skips_smaller_caps_after_a_failure(tmp_path, monkeypatch):
    def fake_run(contestant, cap_mib, round_index, args):
        fits = contestant.name == "small" or cap_mib >= 256
        return {"round": round_index, "cap_mib": cap_mib, "contestant": contestant.name,
                "status": "completed" if fits else "killed", "phase": None if fits else "load",
                "returncode": 0 if fits else -9, "wall_s": 1.0, "cgroup_peak_bytes": cap_mib * 2**20,
                "oom_kills": 0, "page_cache_dropped": True, "other_processes_mapping": [],
                **({"decode_tokens_per_s": 2.0 + round_index, "exec_to_first_token_s": 1.0,
                    "decode_peak_rss_bytes": 60 * 2**20} if fits else {})}

    monkeypatch.setattr(race_memory, "run_once", fake_run)
    monkeypatch.setattr(race_memory, "find_memory_cgroup", lambda: ("/sys/fs/cgroup/memory", 1))
    results = tmp_path / "results"
    code = race_memory.main(["--no-llama-cpp", "--caps", "512,256,128,64", "--rounds", "3", "--ppl-chunks", "0",
                             "--stagejax", "small=schedule=atomic", "--stagejax", "large=schedule=model",
                             "--out", str(tmp_path / "out"), "--results", str(results)])
    assert code == 0
    runs = json.loads((results / "runs.json").read_text())
    large = [r for r in runs["runs"] if r["contestant"] == "large"]
    assert [r["status"] for r in large if r["round"] == 0] == ["completed", "completed", "killed", "skipped"]
    assert runs["meta"]["n_runs"] == 3 * 4 + 3 * 3 and runs["meta"]["runs_with_other_processes_mapping"] == 0
    summary = (results / "summary.md").read_text()
    assert "| 64 | small | float32 (dequantized Q4_1) | 3/3 | 3.00 | 2.00 / 3.00 / 4.00 |" in summary
    assert "skipped (did not complete at 128 MiB)" in summary and "No other process" in summary
    assert (results / "race.png").stat().st_size > 0 and (results / "summary.csv").exists()
    assert json.loads((tmp_path / "out" / "runs.partial.json").read_text())["runs"] == runs["runs"]
