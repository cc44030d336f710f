"""Reading consecutive small units together, within the prefetcher's slab size.

The prefetcher's slabs are as large as the largest unit, so a slab that holds one small unit
(a 147 KB query head) could hold several of them at no extra memory. Every hand-off between
the reader thread and the executor costs tens of microseconds here (thread wake-ups and GIL
hand-overs: an `atomic` step of the tiny preset takes 22 µs per group without a reader
thread, 41 with depth 1 and 67 with depth 2), so `CoalescingPrefetcher` reads runs of
consecutive units whose total fits the largest unit's size as one read unit, then hands the
units out one by one. Memory is unchanged: depth + 1 slabs of the largest unit's size. A
read unit's slab is released when the last of its units is.
"""

from __future__ import annotations

from typing import Sequence

from stagejax_device.native_stream import make_prefetcher
from stagejax_device.weight_store import ALIGN_BYTES, Prefetcher


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def coalesce(unit_bytes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """Runs [first, stop) of consecutive units whose total bytes stay within `limit` (a unit
    larger than `limit` is a run of its own)."""
    runs, first, total = [], 0, 0
    for i, size in enumerate(unit_bytes):
        if i > first and total + size > limit:
            runs.append((first, i))
            first, total = i, 0
        total += size
    if unit_bytes:
        runs.append((first, len(unit_bytes)))
    return runs


class CoalescingPrefetcher:
    """`Prefetcher`'s interface (next / release / close, cycling over `units`), reading runs of
    consecutive units that fit one slab together. `reader`: which prefetcher reads the runs
    (`native_stream.make_prefetcher`: "auto", "native" or "python"; `native_dir`: where the
    C reader is compiled)."""

    def __init__(self, store, units: Sequence[Sequence[str]], depth: int, reader: str = "auto",
                 native_dir=None):
        self._units = [tuple(u) for u in units]
        sizes = [sum(_aligned(store.nbytes([k])) for k in unit) for unit in self._units]
        self.runs = coalesce(sizes, max(sizes) if sizes else 0)
        self._inner: Prefetcher = make_prefetcher(
            store, [[k for unit in self._units[a:b] for k in unit] for a, b in self.runs], depth,
            reader, native_dir)
        self._run_of_unit = [r for r, (a, b) in enumerate(self.runs) for _ in range(a, b)]
        self._index = 0
        self._arrays: dict | None = None  # the current run's arrays (lent by the inner prefetcher)
        self._outstanding = 0  # units of the current run handed out and not yet released
        self._pending: dict[int, dict] = {}  # id(unit arrays) -> the run's arrays
        self._left: dict[int, int] = {}  # id(run arrays) -> units not yet released

    @property
    def depth(self) -> int:
        return self._inner.depth

    @property
    def slab_bytes(self) -> int:
        return self._inner.slab_bytes

    @property
    def max_in_flight_units_seen(self) -> int:
        return self._inner.max_in_flight_units_seen

    @property
    def reader(self) -> str:
        """"native" (the GIL-free C reader) or "python" (a Python thread, or none at depth 0)."""
        return "python" if isinstance(self._inner, Prefetcher) else "native"

    @property
    def load_log(self):
        return self._inner.load_log

    @load_log.setter
    def load_log(self, value) -> None:
        self._inner.load_log = value

    def first_unit_of_read(self, read_index: int) -> int:
        """The unit index that a `load_log` entry's read (a run) starts with."""
        return self.runs[read_index][0]

    def next(self) -> dict:
        i = self._index
        self._index = i + 1 if i + 1 < len(self._units) else 0
        first, stop = self.runs[self._run_of_unit[i]]
        if i == first:
            self._arrays = self._inner.next()
            self._left[id(self._arrays)] = stop - first
        run_arrays = self._arrays
        unit = {k: run_arrays[k] for k in self._units[i]}
        self._pending[id(unit)] = run_arrays
        return unit

    def release(self, arrays) -> None:
        run_arrays = self._pending.pop(id(arrays), None)
        if run_arrays is None:
            raise ValueError("release() of a unit this prefetcher did not hand out, or released twice")
        key = id(run_arrays)
        self._left[key] -= 1
        if self._left[key] == 0:
            del self._left[key]
            self._inner.release(run_arrays)

    def close(self) -> None:
        self._inner.close()
