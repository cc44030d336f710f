"""Measuring the process: resident memory (current, high-water mark, resettable), its own
cgroup's charge when it runs under a cap, its age, and the phase it is in.

Linux only: reads /proc/self/status; resets the high-water mark by writing 5 to
/proc/self/clear_refs (see MACHINE_NOTES: peak RSS).
"""

from __future__ import annotations

import os
from pathlib import Path

from stagejax_device.results import atomic_write_json

# A job reports its phase in this file of its run directory (`PhaseLog`).
PHASE_FILE = "phase.json"


def _status_field_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field} line")


def rss_bytes() -> int:
    """Current resident set size."""
    return _status_field_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """High-water resident set size since process start or the last `reset_peak_rss()`."""
    return _status_field_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS. False if the kernel refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def process_age_s() -> float:
    """Seconds since this process was exec'd (the kernel's start time, 10 ms resolution): the
    clock a user starting the program reads, imports and compilation included."""
    with open("/proc/self/stat") as stat:
        # Field 22 is starttime in clock ticks since boot; the command name (field 2) may hold
        # spaces, so count from its closing parenthesis.
        fields = stat.read().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])
    with open("/proc/uptime") as uptime:
        uptime_s = float(uptime.read().split()[0])
    return uptime_s - start_ticks / os.sysconf("SC_CLK_TCK")


def _own_memory_cgroup() -> tuple[Path, int] | None:
    """(directory, version) of this process's memory cgroup, or None where there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            directory = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (directory / "memory.limit_in_bytes").exists():
                return directory, 1
    for line in lines:
        if line.startswith("0::"):
            directory = Path("/sys/fs/cgroup") / line[3:].lstrip("/")
            if (directory / "memory.max").exists():
                return directory, 2
    return None


def cgroup_memory() -> dict | None:
    """This process's cgroup memory limit and peak usage (page cache charged to it included),
    when it runs under a finite limit; None otherwise. Under `scripts/memcap.py --from-start`
    the peak is the whole run's; under its decode-start cap, the capped phase's."""
    found = _own_memory_cgroup()
    if found is None:
        return None
    directory, version = found
    limit_name, peak_name = (("memory.max", "memory.peak") if version == 2
                             else ("memory.limit_in_bytes", "memory.max_usage_in_bytes"))

    def read(name: str) -> int | None:
        try:
            text = (directory / name).read_text().strip()
        except OSError:
            return None
        return None if text == "max" else int(text)

    limit = read(limit_name)
    if limit is None or limit >= 1 << 60:  # v1 reports "no limit" as a huge number
        return None
    return {"cgroup_limit_bytes": limit, "cgroup_peak_bytes": read(peak_name)}


class PhaseLog:
    """The job's current phase, written atomically to `<run dir>/PHASE_FILE` at each change, with
    the process's RSS, high-water RSS and age then: a job killed under a memory cap leaves
    behind where it was (stagejax.memcap reads it), and a finished one a phase-by-phase record."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = None if path is None else Path(path)
        self.phases: list[dict] = []

    def enter(self, phase: str) -> None:
        self.phases.append({"phase": phase, "age_s": round(process_age_s(), 3),
                            "rss_bytes": rss_bytes(), "peak_rss_bytes": peak_rss_bytes()})
        if self.path is not None:
            atomic_write_json(self.path, {"phase": phase, "phases": self.phases})


class PeakRss:
    """High-water RSS per phase, and over the whole run despite the per-phase resets.

    Resetting the kernel's mark (clear_refs) forgets the earlier peak, so the running maximum
    is kept here: `overall_bytes` is the run's true high-water mark.
    """

    def __init__(self):
        self.overall_bytes = peak_rss_bytes()

    def start_phase(self) -> None:
        """Fold the mark so far into the overall peak, then reset it for the next phase."""
        self.overall_bytes = max(self.overall_bytes, peak_rss_bytes())
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the RSS high-water mark (/proc/self/clear_refs "
                               "refused); per-phase peaks would be wrong")

    def phase_peak_bytes(self) -> int:
        peak = peak_rss_bytes()
        self.overall_bytes = max(self.overall_bytes, peak)
        return peak
