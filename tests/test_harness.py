"""The experiment harness: every YAML composes, bad overrides fail clearly, a submitit sweep with
wandb offline, and the memory cap (scripts/memcap.py) — its refusal where cgroups are missing,
and a capped tiny-model run where this machine has a usable memory cgroup."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import stagejax.convert  # noqa: F401 - registers convert_schema for conf/convert.yaml
from stagejax.run import to_settings
from stagejax.settings import RunSettings
from stagejax.tracking import find_offline_runs, read_offline_run

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MB = 2**20


def _defaults_groups(config_name: str) -> set[str]:
    """Groups a primary config's defaults list names (overridden without `+`)."""
    groups = set()
    for entry in yaml.safe_load((CONF / f"{config_name}.yaml").read_text()).get("defaults", []):
        if isinstance(entry, dict):
            groups |= {key.split(" ")[-1].lstrip("/") for key in entry}
    return groups


RUN_GROUPS = _defaults_groups("config")
# Every YAML below conf/, including groups other work adds later: primary configs at the top,
# options of a group (conf/<group>/..., hydra's own as conf/hydra/<group>/...) below.
YAMLS = sorted(p.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml"))


def group_override(group: str, option: str) -> str:
    """`group=option` for groups in the defaults list (and hydra's), else `+group=option`."""
    listed = group in RUN_GROUPS or group.startswith("hydra/")
    return f"{'' if listed else '+'}{group}={option}"


def compose_yaml(relative: str):
    path = Path(relative)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        if len(path.parts) == 1:  # a primary config (config.yaml, convert.yaml)
            return compose(config_name=path.stem), path.stem
        group = path.parent.as_posix()
        return compose(config_name="config", overrides=[group_override(group, path.stem)],
                       return_hydra_config=group.startswith("hydra/")), "config"


@pytest.mark.parametrize("relative", YAMLS)
def test_every_yaml_composes(relative):
    cfg, primary = compose_yaml(relative)
    if relative.startswith("hydra/"):
        assert cfg.hydra.runtime.choices[str(Path(relative).parent)] == Path(relative).stem
        return
    if primary == "config":
        assert isinstance(to_settings(cfg), RunSettings)
    else:  # another entry point's primary config, over its own registered schema
        assert OmegaConf.to_object(cfg) is not None


def test_experiment_presets_set_what_they_promise():
    cfg, _ = compose_yaml("experiment/smoke.yaml")
    smoke = to_settings(cfg)
    assert (smoke.model.name, smoke.schedule.policy, smoke.decode.max_new_tokens,
            smoke.eval.ppl_chunks) == ("tiny", "atomic", 8, 1)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_cfg = compose(config_name="config",
                            overrides=[group_override("experiment", "staged_vs_classic")],
                            return_hydra_config=True).hydra
    assert hydra_cfg.sweeper.max_batch_size == 1  # one fresh process at a time
    assert hydra_cfg.runtime.choices["hydra/launcher"] == "submitit_local"
    cfg, _ = compose_yaml("experiment/staged_vs_classic.yaml")
    assert len(to_settings(cfg).decode.prompt.encode()) == 480  # + 32 new tokens = context 512


def test_bad_overrides_get_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="schedule.kv_block must be a positive number, got -1"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            to_settings(compose(config_name="config", overrides=["schedule.kv_block=-1"]))
    with pytest.raises(ConfigCompositionException, match="schedule"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            compose(config_name="config", overrides=["schedule=foo"])
    # Through the entry point, in a sweep: the error names the key, before anything is loaded.
    completed = subprocess.run(
        [sys.executable, "-m", "stagejax.run", "-m", "model=tiny", "schedule=atomic,model",
         "schedule.kv_block=-1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert "schedule.kv_block must be a positive number, got -1" in completed.stderr
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.fixture(scope="module")
def submitit_sweep(tmp_path_factory):
    """Two tiny-model jobs through submitit's local executor, wandb offline in each."""
    sweep = tmp_path_factory.mktemp("submitit") / "sweep"
    completed = subprocess.run(
        [sys.executable, "-m", "stagejax.run", "-m", "model=tiny", "schedule=atomic,model",
         "eval.ppl_chunks=1", "eval.n_ctx=16", "decode.max_new_tokens=3", "tracking.mode=offline",
         "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return sweep


def test_submitit_sweep_writes_complete_runs(submitit_sweep):
    pids = set()
    for job in ("0", "1"):
        metrics = json.loads((submitit_sweep / job / "metrics.json").read_text())
        assert {"baseline_rss_bytes", "peak_rss_decode_bytes", "decode_tokens_per_s", "ppl",
                "n_groups", "generated_text"} <= set(metrics)
        info = json.loads((submitit_sweep / job / "job.json").read_text())
        assert info["launcher"] == "submitit_local" and info["job_num"] == int(job)
        pids.add(info["pid"])
    assert len(pids) == 2  # one process per job
    assert (submitit_sweep / "report.md").exists()


def test_wandb_offline_files_hold_the_metrics(submitit_sweep):
    run_ids = set()
    for job in ("0", "1"):
        job_dir = submitit_sweep / job
        runs = find_offline_runs(job_dir)
        assert len(runs) == 1, runs  # inside the job's own directory: jobs cannot collide
        offline = read_offline_run(runs[0])
        run_ids.add(offline.run_id)
        metrics = json.loads((job_dir / "metrics.json").read_text())
        for key in ("decode_tokens_per_s", "peak_rss_decode_bytes", "n_groups", "schedule", "ppl"):
            assert offline.summary[key] == pytest.approx(metrics[key]), key
        assert offline.config["model"]["name"] == "tiny"
        assert offline.config["schedule"]["policy"] == metrics["schedule"]
        assert {"plan", "timeline", "memory_timeline"} <= set(offline.logged_keys)
        assert list(job_dir.glob("wandb/offline-run-*/files/media/table/plan_*.table.json"))
    assert len(run_ids) == 2


# ---- the memory cap ---------------------------------------------------------------------------


def load_memcap():
    spec = importlib.util.spec_from_file_location("memcap", REPO / "scripts" / "memcap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memcap"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def fake_proc(tmp_path, mounts: str, cgroup: str):
    (tmp_path / "mounts").write_text(mounts)
    (tmp_path / "cgroup").write_text(cgroup)
    return str(tmp_path / "mounts"), str(tmp_path / "cgroup")


def test_memcap_says_why_when_no_cgroup_is_usable(tmp_path):
    memcap = load_memcap()
    mounts, cgroup = fake_proc(tmp_path, "proc /proc proc rw 0 0\n", "0::/\n")
    with pytest.raises(memcap.CgroupUnavailable, match="no cgroup filesystem with a memory controller"):
        memcap.find_memory_cgroup(mounts, cgroup)
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("cpu io pids\n")
    mounts, cgroup = fake_proc(tmp_path, f"cgroup2 {unified} cgroup2 rw 0 0\n", "0::/\n")
    with pytest.raises(memcap.CgroupUnavailable, match="cgroup v2 at .* has no memory controller"):
        memcap.find_memory_cgroup(mounts, cgroup)
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "memcap.py"), "--proc-mounts", mounts,
         "--proc-cgroup", cgroup, "--budget-mb", "4", "--", "model=tiny"],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "cannot cap memory on this machine: cgroup v2 at" in completed.stderr


def test_memcap_protocol_orders_v1_memsw_writes(tmp_path):
    memcap = load_memcap()
    for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
        (tmp_path / name).write_text("0")
    spec = memcap.Cgroup(tmp_path, 1).protocol(20 * MB)
    assert spec["above_bytes"] == 20 * MB
    assert [Path(p).name for p in spec["limit_files"]] == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    assert [Path(p).name for p in spec["unlimit_files"]] == ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    assert Path(spec["reclaim_file"]).name == "memory.force_empty"


def test_memcap_runs_the_tiny_model_under_a_cap(tmp_path):
    memcap = load_memcap()
    try:
        memcap.find_memory_cgroup()
    except memcap.CgroupUnavailable as error:
        pytest.skip(f"no usable memory cgroup here: {error}")
    completed = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "memcap.py"), "--budget-mb", "4", "--margin-mb", "16",
         "--out", str(tmp_path), "--", "model=tiny", "schedule=atomic", "eval.ppl_chunks=0",
         "decode.max_new_tokens=4", "tracking.mode=disabled"],
        capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    report = json.loads((tmp_path / "memcap_report.json").read_text())
    assert report["completed"] and report["cgroup_removed"]
    assert report["limit_bytes"] == report["cgroup_usage_at_cap_bytes"] + 20 * MB
    assert report["cgroup_usage_at_cap_bytes"] <= report["cgroup_peak_bytes"] <= report["limit_bytes"]
    assert report["oom_kills"] == 0
    overrides = json.loads((tmp_path / "capped" / "job.json").read_text())["overrides"]
    assert "store.drop_page_cache=true" in overrides  # weights read cold, charged to the job
    assert "completed under the cap" in completed.stdout
    assert not Path(report["cgroup"]).exists()
