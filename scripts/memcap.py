#!/usr/bin/env python
"""Run the main job under a real memory cap: a cgroup limit of runtime baseline + budget + margin.

    scripts/memcap.py --budget-mb 4 --margin-mb 16 -- model=smollm2_135m schedule=atomic \\
        cache=disk schedule.ffn_chunks=8 schedule.vocab_chunk=512 eval.ppl_chunks=0

What it does:
  1. finds a cgroup memory controller this process may use (cgroup v2 `memory.max`, or the v1
     memory hierarchy's `memory.limit_in_bytes`) and creates a child cgroup under this
     process's own one; where none is usable it prints why and exits with status 2;
  2. without `--budget-mb`, runs the same configuration once, uncapped and short, to read the
     plan's predicted decode peak (`planned_peak_bytes`, design §5) and uses it as the budget;
  3. starts `python -m stagejax.run <overrides> store.drop_page_cache=true` inside the cgroup
     (it joins before exec, so every page it touches is charged there). The job drops the
     checkpoint's pages from the page cache after verifying them (posix_fadvise DONTNEED), so
     weight reads during decode come from storage and are charged to the job;
  4. when decoding starts, the job has the kernel reclaim the page cache charged to the
     cgroup and sets the limit to the cgroup's remaining usage — its runtime baseline as the
     kernel accounts it — + budget + margin; it lifts the limit when the experiment returns
     (before plots and wandb, whose `wandb-core` process would count);
  5. reports whether the job completed, the cap, the cgroup's peak while capped (and whether
     it ran at the limit, the kernel reclaiming page cache to stay under), the job's measured
     decode peak, and any OOM kill; writes `memcap_report.json` next to the run.

Why the cap starts at decode and not at process start: compiling executables and parsing
the GGUF metadata cost transient memory above the baseline (design §7 measures the baseline
after them), so a cap of baseline + budget from the start would kill the job before it runs.
The cap bounds the phase `peak_rss_decode_bytes` measures: the decode (plus the perplexity
passes, if any, which run afterwards under the same cap).

Why the cgroup's usage and not `baseline_rss_bytes`: RSS counts pages of shared libraries
(jaxlib's are ~100+ MB) that other processes already brought into the page cache; the kernel
charges those to the cgroups that first read them, not to this job. A limit of RSS + budget
would leave that difference as unintended headroom; usage + budget does not.

Why not `prlimit --as` / RLIMIT_AS: it limits virtual address space, not resident memory.
XLA's CPU runtime reserves far more address space than it touches (thread stacks, allocator
arenas, mapped shared libraries; see docs/harness.md for a measured VmPeak vs VmHWM), so a
limit near the resident set fails at start-up and a limit that lets JAX start caps nothing.

Exit status: 0 the job completed under the cap; 1 it did not (killed, or an error); 2 no usable
cgroup memory controller here.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
MEMCAP_ENV = "STAGEJAX_MEMCAP"  # the protocol read by stagejax.run.MemoryCap


class CgroupUnavailable(RuntimeError):
    """No cgroup memory controller this process can use; the message says why."""


@dataclasses.dataclass
class Cgroup:
    """One cgroup directory with a memory controller, and its interface files by version."""

    path: Path
    version: int  # 1 or 2

    def file(self, name: str) -> str:
        return str(self.path / name)

    def protocol(self, above_bytes: int) -> dict:
        """The STAGEJAX_MEMCAP object telling the job which files set, read and lift the cap
        (see stagejax.run.MemoryCap)."""
        if self.version == 2:
            spec = {"reclaim_file": self.file("memory.reclaim"), "reclaim_value": str(1 << 40),
                    "limit_files": [self.file("memory.max")],
                    "unlimit_files": [self.file("memory.max")], "unlimited": "max",
                    "usage_file": self.file("memory.current"),
                    # memory.peak: reset per open file on kernels >= 6.12 only, so it is the
                    # whole job's peak here, not the capped phase's.
                    "peak_file": self.file("memory.peak") if (self.path / "memory.peak").exists() else None,
                    "peak_reset": None, "failcnt_files": []}
            if (self.path / "memory.swap.max").exists():  # a swapped-out page is not a capped page
                Path(self.file("memory.swap.max")).write_text("0")
        else:
            limit = [self.file("memory.limit_in_bytes")]
            unlimit = [self.file("memory.limit_in_bytes")]
            if (self.path / "memory.memsw.limit_in_bytes").exists():
                # memsw (memory + swap) must stay >= memory: set it after memory when lowering,
                # before memory when lifting.
                limit.append(self.file("memory.memsw.limit_in_bytes"))
                unlimit.insert(0, self.file("memory.memsw.limit_in_bytes"))
            spec = {"reclaim_file": self.file("memory.force_empty"), "reclaim_value": "0",
                    "limit_files": limit, "unlimit_files": unlimit, "unlimited": "-1",
                    "usage_file": self.file("memory.usage_in_bytes"),
                    "peak_file": self.file("memory.max_usage_in_bytes"), "peak_reset": "0",
                    # memory+swap is charged first, so with memsw a hit counts there.
                    "failcnt_files": [self.file(f) for f in ("memory.failcnt", "memory.memsw.failcnt")
                                      if (self.path / f).exists()]}
        return {"above_bytes": int(above_bytes), **spec}

    def join(self) -> None:
        """Move the calling process into this cgroup (run in the child before exec)."""
        Path(self.file("cgroup.procs")).write_text(str(os.getpid()))

    def read_int(self, name: str) -> int | None:
        try:
            text = Path(self.file(name)).read_text().strip()
        except OSError:
            return None
        return None if text == "max" else int(text)

    def state_after_kill(self, above_bytes: int) -> dict:
        """The cap's record rebuilt from the cgroup after the job was killed under it: the
        limit is still in place (nothing lifted it), and limit = usage at decode start + above."""
        limit = self.read_int("memory.max" if self.version == 2 else "memory.limit_in_bytes")
        if limit is None or limit >= 1 << 60:  # v1 reports "unlimited" as a huge number
            return {}
        return {"limit_bytes": limit, "cgroup_usage_at_cap_bytes": limit - above_bytes,
                "above_bytes": above_bytes, "applied_at": "decode start",
                "cgroup_peak_bytes": self.read_int("memory.peak" if self.version == 2
                                                   else "memory.max_usage_in_bytes"),
                "charge_failures": None if self.version == 2 else sum(
                    self.read_int(f) or 0 for f in ("memory.failcnt", "memory.memsw.failcnt"))}

    def oom_kills(self) -> int | None:
        """OOM kills inside this cgroup (v1 memory.oom_control, v2 memory.events)."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            for line in Path(self.file(name)).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return None

    def remove(self, timeout_s: float = 10.0) -> bool:
        """rmdir the cgroup, waiting for exiting processes to leave it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return True
            except OSError as error:
                if error.errno != errno.EBUSY or time.monotonic() > deadline:
                    return False
                time.sleep(0.2)


def _mounts(path: str) -> list[tuple[str, str, list[str]]]:
    """(mount point, filesystem type, options) of every mount."""
    rows = []
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4:
            rows.append((fields[1], fields[2], fields[3].split(",")))
    return rows


def _own_cgroups(path: str) -> dict[str, str]:
    """Controller (or "" for cgroup v2) -> this process's cgroup path, from /proc/self/cgroup."""
    own = {}
    for line in Path(path).read_text().splitlines():
        _, controllers, cgroup_path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = cgroup_path
    return own


def _writable_dir(directory: Path) -> str | None:
    """None if a child cgroup can be made in `directory`, else why not."""
    if not directory.is_dir():
        return f"{directory} does not exist"
    if not os.access(directory, os.W_OK):
        return (f"{directory} is not writable by uid {os.getuid()} (no delegated cgroup: run as "
                "root, or on a systemd host use a delegated user slice)")
    return None


def find_memory_cgroup(proc_mounts: str = "/proc/self/mounts",
                       proc_cgroup: str = "/proc/self/cgroup") -> tuple[Path, int]:
    """(directory to create capped cgroups in, cgroup version), or CgroupUnavailable."""
    mounts = _mounts(proc_mounts)
    own = _own_cgroups(proc_cgroup)
    reasons = []
    for mount_point, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        controllers_file = Path(mount_point) / "cgroup.controllers"
        controllers = controllers_file.read_text().split() if controllers_file.exists() else []
        if "memory" not in controllers:
            reasons.append(f"cgroup v2 at {mount_point} has no memory controller (controllers: "
                           f"{' '.join(controllers) or 'none'}); it is bound to a v1 hierarchy "
                           "or disabled")
            continue
        parent = Path(mount_point) / own.get("", "/").lstrip("/")
        problem = _writable_dir(parent)
        if problem is None:
            subtree = (parent / "cgroup.subtree_control")
            enabled = subtree.read_text().split() if subtree.exists() else []
            if "memory" not in enabled:
                try:
                    subtree.write_text("+memory")
                except OSError as error:
                    problem = (f"cannot enable the memory controller for children of {parent} "
                               f"({error.strerror}): cgroup v2 allows it only in a cgroup without "
                               "processes of its own, or one delegated to you")
        if problem is None:
            return parent, 2
        reasons.append(problem)
    for mount_point, fstype, options in mounts:
        if fstype != "cgroup" or "memory" not in options:
            continue
        if "ro" in options:
            reasons.append(f"the v1 memory hierarchy at {mount_point} is mounted read-only")
            continue
        parent = Path(mount_point) / own.get("memory", "/").lstrip("/")
        problem = _writable_dir(parent)
        if problem is None:
            return parent, 1
        reasons.append(problem)
    if not reasons:
        reasons.append(f"no cgroup filesystem with a memory controller is mounted ({proc_mounts} "
                       "lists no cgroup2 mount and no v1 mount with the memory option)")
    raise CgroupUnavailable("; ".join(reasons))


def create_cgroup(parent: Path, version: int, name: str) -> Cgroup:
    path = parent / name
    try:
        path.mkdir()
    except OSError as error:
        raise CgroupUnavailable(f"cannot create the cgroup {path}: {error.strerror}") from error
    limit_file = "memory.max" if version == 2 else "memory.limit_in_bytes"
    if not (path / limit_file).exists():
        path.rmdir()
        raise CgroupUnavailable(f"{path} has no {limit_file}: the memory controller is not active "
                                "for it")
    return Cgroup(path, version)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def _with(overrides: list[str], extra: dict[str, str], replace: bool) -> list[str]:
    """`overrides` plus `extra` (key -> value); `replace`: extra wins over the user's value."""
    keys = {_key(o) for o in overrides}
    kept = [o for o in overrides if not (replace and _key(o) in extra)]
    return kept + [f"{k}={v}" for k, v in extra.items() if replace or k not in keys]


def run_job(python: str, overrides: list[str], run_dir: Path, env: dict | None = None,
            cgroup: Cgroup | None = None) -> int:
    command = [python, "-m", "stagejax.run", *overrides, f"hydra.run.dir={run_dir}"]
    print("memcap: $ " + " ".join(command), flush=True)
    completed = subprocess.run(command, cwd=REPO, env=env,
                               preexec_fn=cgroup.join if cgroup is not None else None)
    return completed.returncode


def probe_budget(python: str, overrides: list[str], out: Path) -> int:
    """The plan's predicted decode peak, from a short uncapped run of the same configuration."""
    probe = _with(overrides, {"decode.max_new_tokens": "2", "eval.ppl_chunks": "0",
                              "tracking.mode": "disabled"}, replace=True)
    run_dir = out / "probe"
    if run_job(python, probe, run_dir) != 0:
        raise SystemExit(f"memcap: the uncapped probe run failed (see {run_dir}); fix the "
                         "configuration or pass --budget-mb")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"memcap: probe: planned decode peak {metrics['planned_peak_bytes'] / MB:.1f} MB, runtime "
          f"baseline {metrics['baseline_rss_bytes'] / MB:.1f} MB", flush=True)
    return int(metrics["planned_peak_bytes"])


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run `python -m stagejax.run <overrides>` inside a cgroup memory limit of its "
                    "runtime baseline + budget + margin, applied when decoding starts.",
        epilog="Everything after the options (or after --) is passed to stagejax.run as hydra overrides.")
    parser.add_argument("--budget-mb", type=float,
                        help="memory above the baseline the decode may use (default: schedule.budget_mb "
                             "if overridden, else the plan's predicted peak from a short probe run)")
    parser.add_argument("--margin-mb", type=float, default=16.0,
                        help="added to the budget: kernel memory, page tables and RSS noise that the "
                             "cgroup charges but the plan does not model (default 16)")
    parser.add_argument("--out", help="directory for the run(s) and memcap_report.json "
                                      "(default outputs/memcap/<date>_<time>)")
    parser.add_argument("--python", default=sys.executable, help="interpreter running the job")
    parser.add_argument("--proc-mounts", default="/proc/self/mounts", help=argparse.SUPPRESS)  # tests
    parser.add_argument("--proc-cgroup", default="/proc/self/cgroup", help=argparse.SUPPRESS)  # tests
    args, overrides = parser.parse_known_args(argv)
    overrides = [o for o in overrides if o != "--"]
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        parser.error(f"unknown option(s) {' '.join(unknown)}; hydra overrides look like key=value")
    if args.margin_mb < 0 or (args.budget_mb is not None and args.budget_mb < 0):
        parser.error("--budget-mb and --margin-mb must be >= 0")

    try:
        parent, version = find_memory_cgroup(args.proc_mounts, args.proc_cgroup)
    except CgroupUnavailable as error:
        print(f"memcap: cannot cap memory on this machine: {error}", file=sys.stderr)
        return 2

    out = Path(args.out or REPO / "outputs" / "memcap" / time.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    user_budget = next((o.split("=", 1)[1] for o in overrides if _key(o) == "schedule.budget_mb"), None)
    if args.budget_mb is not None:
        budget, budget_source = int(args.budget_mb * MB), "--budget-mb"
    elif user_budget not in (None, "null"):
        budget, budget_source = int(float(user_budget) * MB), "schedule.budget_mb"
    else:
        budget, budget_source = probe_budget(args.python, overrides, out), "planned_peak_bytes (probe run)"
    margin = int(args.margin_mb * MB)

    try:
        cgroup = create_cgroup(parent, version, f"stagejax-memcap-{os.getpid()}")
    except CgroupUnavailable as error:
        print(f"memcap: cannot cap memory on this machine: {error}", file=sys.stderr)
        return 2
    run_dir = out / "capped"
    env = dict(os.environ, **{MEMCAP_ENV: json.dumps(cgroup.protocol(budget + margin))})
    capped = _with(overrides, {"store.drop_page_cache": "true"}, replace=False)
    try:
        returncode = run_job(args.python, capped, run_dir, env, cgroup)
        cap = _read_json(run_dir / "memcap.json") or {}
        metrics = _read_json(run_dir / "metrics.json")
        oom_kills = cgroup.oom_kills()
        if not cap:  # killed (SIGKILL leaves no memcap.json): read what the cgroup still holds
            cap = cgroup.state_after_kill(budget + margin)
    finally:
        removed = cgroup.remove()
    completed = returncode == 0 and metrics is not None
    report = {
        "completed": completed, "returncode": returncode, "cgroup": str(cgroup.path),
        "cgroup_version": version, "cgroup_removed": removed, "budget_bytes": budget,
        "budget_source": budget_source, "margin_bytes": margin, "oom_kills": oom_kills,
        "run_dir": str(run_dir), "overrides": capped, **cap,
        "peak_rss_decode_bytes": metrics and metrics.get("peak_rss_decode_bytes"),
        "baseline_rss_bytes": metrics and metrics.get("baseline_rss_bytes"),
        "decode_tokens_per_s": metrics and metrics.get("decode_tokens_per_s"),
    }
    sys.path.insert(0, str(REPO))
    from stagejax.results import atomic_write_json

    atomic_write_json(out / "memcap_report.json", report)
    print(format_report(report))
    return 0 if completed else 1


def format_report(r: dict) -> str:
    mb = lambda b: "—" if b is None else f"{b / MB:,.1f} MB"  # noqa: E731
    lines = [f"memcap: cgroup v{r['cgroup_version']} {r['cgroup']}"
             + ("" if r["cgroup_removed"] else " (still present: remove it with rmdir)")]
    if "limit_bytes" in r:
        lines.append(f"  cap {mb(r['limit_bytes'])} = cgroup usage at decode start "
                     f"{mb(r['cgroup_usage_at_cap_bytes'])} (page cache reclaimed) + budget "
                     f"{mb(r['budget_bytes'])} ({r['budget_source']}) + margin {mb(r['margin_bytes'])}; "
                     "applied at decode start, lifted after the experiment")
        lines.append(f"  for comparison: RSS at decode start {mb(r.get('rss_at_cap_bytes'))}, runtime "
                     f"baseline (baseline_rss_bytes) {mb(r.get('baseline_rss_bytes'))}")
    else:
        lines.append(f"  the cap was never applied (budget {mb(r['budget_bytes'])}, margin "
                     f"{mb(r['margin_bytes'])}): the job ended before decoding")
    if r["completed"]:
        lines.append("  job: completed under the cap")
    elif r["returncode"] == -9 or r.get("oom_kills"):
        lines.append(f"  job: KILLED by the kernel's OOM killer inside the cgroup (exit {r['returncode']}, "
                     f"{r.get('oom_kills')} OOM kill(s)): the cap is too small for this configuration")
    else:
        lines.append(f"  job: FAILED (exit {r['returncode']}); see {r['run_dir']}/run.log")
    peak, usage, limit = r.get("cgroup_peak_bytes"), r.get("cgroup_usage_at_cap_bytes"), r.get("limit_bytes")
    above = f" ({mb(peak - usage)} above the usage at decode start)" if peak is not None and usage is not None else ""
    at_limit = ("; it reached the limit: the kernel reclaimed page cache to keep it under"
                if peak is not None and limit is not None and peak >= limit - 4096 else "")
    lines.append(f"  measured: cgroup peak while capped {mb(peak)}{above}, page cache included{at_limit}; "
                 f"decode peak RSS {mb(r.get('peak_rss_decode_bytes'))} above the runtime baseline")
    lines.append(f"  results: {r['run_dir']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
