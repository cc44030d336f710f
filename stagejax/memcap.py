"""Whole-process memory caps with cgroups: find a memory controller, cap a command, read back.

A device owner asks "with N MB for the whole process, does it run, and how fast?". This module
answers it on Linux: a command runs inside a fresh child cgroup whose memory limit is set
before `exec`, so every page the process touches from its first instruction — interpreter,
shared libraries it brings in, heap, and the page cache of the files it reads — is charged
against the cap, as it would be on a device with that much RAM. Used by `scripts/memcap.py`
(one capped run, or a bisection for the smallest cap) and `experiments/race_memory.py`.

The decode-start cap of `stagejax.run.MemoryCap` (a limit set from inside the job when decoding
starts, bounding the working set above the runtime) uses the same `Cgroup` files.

cgroup v1 (memory.limit_in_bytes, memory.memsw.*, memory.max_usage_in_bytes) and v2
(memory.max, memory.swap.max, memory.peak) are both handled; docs/harness.md §5 has this
machine's layout and why `prlimit --as` is no substitute.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stagejax_device.measure import PHASE_FILE

MB = 2**20


class CgroupUnavailable(RuntimeError):
    """No cgroup memory controller this process can use; the message says why."""


@dataclasses.dataclass
class Cgroup:
    """One cgroup directory with a memory controller, and its interface files by version."""

    path: Path
    version: int  # 1 or 2

    def file(self, name: str) -> str:
        return str(self.path / name)

    @property
    def _limit_file(self) -> str:
        return "memory.max" if self.version == 2 else "memory.limit_in_bytes"

    @property
    def _peak_file(self) -> str:
        return "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"

    def protocol(self, above_bytes: int) -> dict:
        """The STAGEJAX_MEMCAP object telling a job which files set, read and lift a cap that
        it applies itself when decoding starts (see stagejax.run.MemoryCap)."""
        if self.version == 2:
            spec = {"reclaim_file": self.file("memory.reclaim"), "reclaim_value": str(1 << 40),
                    "limit_files": [self.file("memory.max")],
                    "unlimit_files": [self.file("memory.max")], "unlimited": "max",
                    "usage_file": self.file("memory.current"),
                    # memory.peak: reset per open file on kernels >= 6.12 only, so it is the
                    # whole job's peak here, not the capped phase's.
                    "peak_file": self.file("memory.peak") if (self.path / "memory.peak").exists() else None,
                    "peak_reset": None, "failcnt_files": []}
            self._no_swap()
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

    def _no_swap(self) -> None:
        if self.version == 2 and (self.path / "memory.swap.max").exists():
            Path(self.file("memory.swap.max")).write_text("0")  # a swapped-out page is not capped

    def set_limit(self, limit_bytes: int) -> None:
        """Cap memory (and memory + swap, so swapping cannot escape the cap) at `limit_bytes`."""
        if self.version == 2:
            self._no_swap()
            Path(self.file("memory.max")).write_text(str(int(limit_bytes)))
            return
        Path(self.file("memory.limit_in_bytes")).write_text(str(int(limit_bytes)))
        if (self.path / "memory.memsw.limit_in_bytes").exists():  # memsw >= memory: after it
            Path(self.file("memory.memsw.limit_in_bytes")).write_text(str(int(limit_bytes)))

    def join(self) -> None:
        """Move the calling process into this cgroup (run in the child before exec)."""
        Path(self.file("cgroup.procs")).write_text(str(os.getpid()))

    def read_int(self, name: str) -> int | None:
        try:
            text = Path(self.file(name)).read_text().strip()
        except OSError:
            return None
        return None if text == "max" else int(text.split()[0])

    def limit_bytes(self) -> int | None:
        limit = self.read_int(self._limit_file)
        return None if limit is None or limit >= 1 << 60 else limit  # v1: "unlimited" is huge

    def peak_bytes(self) -> int | None:
        return self.read_int(self._peak_file)

    def charge_failures(self) -> int | None:
        """Charges the kernel refused after reclaim (v1 failcnt; None on v2)."""
        if self.version == 2:
            return None
        return sum(self.read_int(f) or 0 for f in ("memory.failcnt", "memory.memsw.failcnt"))

    def state_after_kill(self, above_bytes: int) -> dict:
        """A decode-start cap's record rebuilt from the cgroup after the job was killed under it:
        the limit is still in place (nothing lifted it), and limit = usage at decode start + above."""
        limit = self.limit_bytes()
        if limit is None:
            return {}
        return {"limit_bytes": limit, "cgroup_usage_at_cap_bytes": limit - above_bytes,
                "above_bytes": above_bytes, "applied_at": "decode start",
                "cgroup_peak_bytes": self.peak_bytes(), "charge_failures": self.charge_failures()}

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


def drop_page_cache() -> dict:
    """Write back dirty pages and drop the whole machine's page cache (needs root).

    A capped run then reads every file it needs from storage and is charged for the pages it
    brings in, whatever earlier runs cached. Returns what was done, for the run's record."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
    except OSError as error:
        return {"page_cache_dropped": False,
                "page_cache_note": f"/proc/sys/vm/drop_caches: {error.strerror} (needs root); "
                                   "files cached by earlier runs were not dropped"}
    return {"page_cache_dropped": True, "page_cache_note": "echo 3 > /proc/sys/vm/drop_caches"}


# What a capped run ended as (design §7's memory story reads these words).
COMPLETED, KILLED, TIMEOUT, FAILED = "completed", "killed", "over time limit", "failed"


@dataclasses.dataclass
class CappedRun:
    """How one command fared under a whole-process cap."""

    status: str  # COMPLETED | KILLED (by the OOM killer) | TIMEOUT | FAILED (exited non-zero)
    cap_bytes: int
    returncode: int | None
    wall_s: float
    phase: str | None  # the last phase the job reported (PHASE_FILE), e.g. where it was killed
    cgroup_peak_bytes: int | None
    oom_kills: int | None
    charge_failures: int | None
    cgroup_removed: bool
    page_cache: dict
    # Other processes that had the job's libraries mapped when it started: their pages stay
    # resident through the drop and are charged to the cgroup that first read them, not this
    # one, so the cap then covers less of the job than on a device running it alone.
    other_processes_mapping: list = dataclasses.field(default_factory=list)

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    def record(self) -> dict:
        return dataclasses.asdict(self)


def last_phase(run_dir: Path | None) -> str | None:
    if run_dir is None:
        return None
    try:
        return json.loads((Path(run_dir) / PHASE_FILE).read_text()).get("phase")
    except (OSError, ValueError):
        return None


def processes_mapping(prefixes: list[str], exclude: set[int] = frozenset()) -> list[str]:
    """"pid name" of every process (but `exclude`) with a file under one of `prefixes` mapped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            maps = (entry / "maps").read_text()
            name = (entry / "comm").read_text().strip()
        except OSError:  # gone, or not ours to read
            continue
        if any(f" {prefix}" in maps for prefix in prefixes):
            found.append(f"{entry.name} {name}")
    return found


def run_from_start(command: list[str], cap_bytes: int, *, time_limit_s: float,
                   run_dir: Path | None = None, cwd: str | Path | None = None,
                   env: dict | None = None, drop_cache: bool = True, name: str | None = None,
                   stdout=None, stderr=None) -> CappedRun:
    """Run `command` in a new cgroup capped at `cap_bytes` from before its exec.

    The page cache is dropped first (`drop_cache`), so the job pays for every file page it
    reads. A job past `time_limit_s` is killed with its whole process group and reported as
    TIMEOUT, never left to hang; an OOM kill is KILLED, with the last phase the job wrote to
    `run_dir/PHASE_FILE` (stagejax_device.measure.PhaseLog). Raises CgroupUnavailable where no memory controller is usable.
    """
    parent, version = find_memory_cgroup()
    cgroup = create_cgroup(parent, version, name or f"stagejax-cap-{os.getpid()}-{time.monotonic_ns()}")
    page_cache = drop_page_cache() if drop_cache else {"page_cache_dropped": False,
                                                         "page_cache_note": "not asked to"}
    others = processes_mapping([sys.prefix, str(Path(command[0]).resolve().parent.parent)], {os.getpid()})
    try:
        cgroup.set_limit(cap_bytes)

        def enter():
            cgroup.join()
            os.setsid()  # its own process group: a timeout kills the job's children too

        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, preexec_fn=enter,
                                   stdout=stdout, stderr=stderr)
        try:
            returncode = process.wait(timeout=time_limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
            timed_out = True
        wall_s = time.perf_counter() - start
        peak, oom_kills, failures = cgroup.peak_bytes(), cgroup.oom_kills(), cgroup.charge_failures()
    finally:
        removed = cgroup.remove()
    if timed_out:
        status = TIMEOUT
    elif returncode == 0:
        status = COMPLETED
    elif returncode == -signal.SIGKILL or (oom_kills or 0) > 0:
        status = KILLED
    else:
        status = FAILED
    return CappedRun(status, int(cap_bytes), returncode, wall_s, last_phase(run_dir), peak,
                     oom_kills, failures, removed, page_cache, others)
