"""Measuring the process: resident memory (current, high-water mark, resettable) and time.

Linux only: reads /proc/self/status; resets the high-water mark by writing 5 to
/proc/self/clear_refs (see MACHINE_NOTES: peak RSS).
"""

from __future__ import annotations

import time


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


def live_jax_bytes() -> int:
    """Bytes held by live JAX arrays (on CPU `memory_stats()` is None, so count arrays)."""
    import jax

    return sum(array.nbytes for array in jax.live_arrays())


class Stopwatch:
    """Accumulates wall time over several `with` blocks."""

    def __init__(self):
        self.total_s = 0.0
        self.count = 0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total_s += time.perf_counter() - self._start
        self.count += 1


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
