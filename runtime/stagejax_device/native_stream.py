"""A weight prefetcher whose reads and waits run without the GIL (`NativePrefetcher`).

The reading loop is a few lines of C (`_stream.c`), compiled with the system C compiler on first
use into the stagejax cache (keyed by the source's hash; compiled once per machine) and called
through ctypes, which releases the GIL for the call. Why: on this 2-vCPU VM the Python
prefetch thread and the executor hand the GIL and a condition variable back and forth for every
unit, and each hand-off is a cross-core wake-up. `experiments/bench_overlap.py` (atomic SmolLM2,
6 interleaved rounds in one process): executor alone 37.0 ms/step, copies alone 46.5, one after
the other 91.4; with the Python thread 68.5, with this reader 55.6 (0.81x; faster in 5 of 6
rounds). The Python thread's units handed to an executor computing on resident zeros (the
copying and hand-offs alone) took 81.5 ms, this reader's 55.9.

Same interface and memory as `weight_store.Prefetcher` (depth + 1 slabs of the largest unit, at
most `depth` units in flight, shared reads, `load_log`). Not used (the Python prefetcher is)
when: no C compiler is found or compiling fails (a warning says which), checksums are verified on
every read (`verify="read"`: the checks are Python's), or cold-stream read-ahead advice is on.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from stagejax_device.manifest import CheckpointError
from stagejax_device.paths import default_cache_dir
from stagejax_device.weight_store import ALIGN_BYTES, aligned_empty

_SOURCE = Path(__file__).with_name("_stream.c")

# Control array slots (the enum in _stream.c).
STOP, STARTED, HANDED, RELEASED, ERROR, ERROR_READ = 0, 1, 2, 3, 4, 5
STARTED_BYTES, HANDED_BYTES, MAX_UNITS, MAX_BYTES, HEADER = 6, 7, 8, 9, 16


class _Plan(ctypes.Structure):
    _fields_ = [("reads", ctypes.c_void_p), ("first", ctypes.c_void_p),
                ("unit_bytes", ctypes.c_void_p), ("slabs", ctypes.c_void_p),
                ("n_units", ctypes.c_int64), ("n_slabs", ctypes.c_int64),
                ("depth", ctypes.c_int64), ("ctrl", ctypes.c_void_p)]


_library = None
_library_error: str | None = None
_library_lock = threading.Lock()


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(_SOURCE)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {_SOURCE}: {done.stderr.strip()[-500:]}")
        os.replace(built, target)  # atomic: a concurrent process sees no half-written library


def library(build_dir: str | os.PathLike | None = None):
    """The compiled reader (ctypes CDLL), or None if it cannot be built (`library_error()`).

    Compiled on first use into `build_dir` (runs: `${paths.cache}/native`; None:
    `$STAGEJAX_CACHE/native` or `~/.cache/stagejax/native`); a process loads it once."""
    global _library, _library_error
    with _library_lock:
        if _library is None and _library_error is None:
            digest = hashlib.sha256(_SOURCE.read_bytes()).hexdigest()[:16]
            directory = Path(build_dir) if build_dir is not None else default_cache_dir() / "native"
            target = directory / f"stream-{digest}.so"
            try:
                if not target.exists():
                    _compile(target)
                lib = ctypes.CDLL(str(target))
                plan = ctypes.POINTER(_Plan)
                lib.stagejax_stream.argtypes = [plan]
                lib.stagejax_wait.argtypes = [plan, ctypes.c_int64, ctypes.c_int64]
                lib.stagejax_put.argtypes = [plan, ctypes.c_int64, ctypes.c_int64]
                for name in ("stagejax_stream", "stagejax_wait"):
                    getattr(lib, name).restype = ctypes.c_int64
                lib.stagejax_put.restype = None
                _library = lib
            except (OSError, RuntimeError) as error:
                _library_error = str(error)
                warnings.warn(f"stagejax: the GIL-free weight reader is unavailable ({error}); "
                              "using the Python prefetch thread (slower on few cores)",
                              RuntimeWarning, stacklevel=2)
        return _library


def library_error() -> str | None:
    return _library_error


READERS = ("auto", "native", "python")


def uses_native(store_or_verify, depth: int, reader: str = "auto",
                native_dir: str | os.PathLike | None = None) -> bool:
    """Whether `make_prefetcher` picks the C reader (a store, or its verify mode)."""
    verify = getattr(store_or_verify, "verify", store_or_verify)
    applies = depth >= 1 and verify != "read"
    return reader == "native" or (reader == "auto" and applies and library(native_dir) is not None)


def make_prefetcher(store, units: Sequence[Sequence[str]], depth: int, reader: str = "auto",
                    native_dir: str | os.PathLike | None = None):
    """The prefetcher for `units`: `NativePrefetcher` ("native"), the Python thread's
    `weight_store.Prefetcher` ("python"), or "auto": native where it applies (depth >= 1, no
    per-read checksums) and the C reader is available, else Python. `native_dir`: where the
    C reader is compiled (`library`)."""
    if reader not in READERS:
        raise ValueError(f"store.reader must be one of {READERS}, got {reader!r}")
    if reader == "native":
        if depth < 1 or store._verify_reads:
            raise ValueError("store.reader=native needs schedule.prefetch_depth >= 1 and "
                             f"store.verify other than 'read' (got depth {depth}, verify "
                             f"{store.verify!r}); use store.reader=python or auto")
        library(native_dir)
        return NativePrefetcher(store, units, depth)
    if uses_native(store, depth, reader, native_dir):
        return NativePrefetcher(store, units, depth)
    return store.prefetcher(units, depth)


class NativePrefetcher:
    """Reads `units` in order, cycling forever, at most `depth` (>= 1) units ahead, in a thread
    that runs C code without the GIL; see the module docstring and `weight_store.Prefetcher`."""

    def __init__(self, store, units: Sequence[Sequence[str]], depth: int, share_reads: bool = True):
        if depth < 1:
            raise ValueError(f"NativePrefetcher needs prefetch depth >= 1, got {depth}")
        if not units:
            raise ValueError("a Prefetcher needs at least one unit")
        self._lib = library()
        if self._lib is None:
            raise RuntimeError(f"the GIL-free reader is unavailable: {_library_error}")
        self._store = store
        self._units = [tuple(unit) for unit in units]
        self._unit_bytes = [store.nbytes(unit) for unit in self._units]  # also checks the keys
        self.depth = depth
        self.share_reads = share_reads
        self.advise_ahead = False
        self.reads_by_consumer = 0
        self.load_log: list | None = None
        reads, first, self._read_keys = [], [0], []
        self._offsets, slab_bytes = [], 0
        for unit in self._units:
            offsets, end = [], 0
            for key in unit:
                entry = store._entries[key]
                offsets.append(end)
                reads.append((entry.fd, entry.nbytes, end))
                self._read_keys.append(key)
                end += -(-entry.nbytes // ALIGN_BYTES) * ALIGN_BYTES
            first.append(len(reads))
            self._offsets.append(tuple(offsets))
            slab_bytes = max(slab_bytes, end)
        self.slab_bytes = slab_bytes
        # Slabs are allocated untouched: their pages count only once reads fill them.
        self._slabs = [aligned_empty(max(slab_bytes, ALIGN_BYTES)) for _ in range(depth + 1)]
        self._reads = np.asarray(reads, np.int64).reshape(-1, 3)
        self._first = np.asarray(first, np.int64)
        self._sizes = np.asarray(self._unit_bytes, np.int64)
        self._slab_pointers = (ctypes.c_void_p * len(self._slabs))(*(s.ctypes.data for s in self._slabs))
        self._ctrl = np.zeros(HEADER + 3 * len(self._slabs), np.int64)
        self._plan = _Plan(self._reads.ctypes.data, self._first.ctypes.data,
                           self._sizes.ctypes.data, ctypes.cast(self._slab_pointers, ctypes.c_void_p),
                           len(self._units), len(self._slabs), depth, self._ctrl.ctypes.data)
        self._plan_ref = ctypes.byref(self._plan)
        # Each unit's arrays as views of each slab, built once (next() only picks them).
        self._views = [[{key: slab[offset:offset + store._entries[key].nbytes]
                         .view(store._entries[key].dtype).reshape(store._entries[key].shape)
                         for key, offset in zip(unit, offsets)}
                        for unit, offsets in zip(self._units, self._offsets)]
                       for slab in self._slabs]
        self._handed = self._released = self._handed_bytes = 0
        self._lent: dict[int, int] = {}  # id(arrays) -> unit bytes, for release()
        self._thread: threading.Thread | None = None  # started by the first next()
        self._closed = False
        store._prefetchers.add(self)  # the store's close() stops this reader too

    @property
    def in_flight_units(self) -> int:
        return int(self._ctrl[STARTED]) - self._handed

    @property
    def in_flight_bytes(self) -> int:
        return int(self._ctrl[STARTED_BYTES]) - self._handed_bytes

    @property
    def max_in_flight_units_seen(self) -> int:
        return int(self._ctrl[MAX_UNITS])

    @property
    def max_in_flight_bytes_seen(self) -> int:
        return int(self._ctrl[MAX_BYTES])

    def _run(self) -> None:
        self._lib.stagejax_stream(self._plan_ref)  # returns at close() or after a read error

    def next(self) -> dict[str, np.ndarray]:
        """The next unit's arrays (lent: `release` them), in unit order, cycling."""
        if self._closed:
            raise ValueError("Prefetcher is closed")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stagejax-stream", daemon=True)
            self._thread.start()
        count = self._handed
        slot = HEADER + 3 * (count % len(self._slabs))
        # Always through C: its acquire load orders the slab's bytes after the published count
        # on any CPU (a numpy read of the flag would be enough only on x86). ~1 µs when ready.
        ready = self._ctrl[slot] == count + 1  # only decides whether this counts as waiting
        start = time.perf_counter()
        own = self._lib.stagejax_wait(self._plan_ref, count, int(self.share_reads))
        if not ready:
            self._store._add_wait(time.perf_counter() - start)
        if own < 0:
            self._raise_failure()
        self.reads_by_consumer += own
        i = count % len(self._units)
        nbytes = self._unit_bytes[i]
        self._handed = count + 1
        self._handed_bytes += nbytes
        self._lib.stagejax_put(self._plan_ref, HANDED_BYTES, self._handed_bytes)
        self._lib.stagejax_put(self._plan_ref, HANDED, self._handed)
        store = self._store
        with store._lock:
            store.bytes_read += nbytes
            store.resident_bytes += nbytes  # until release()
        if self.load_log is not None:
            self.load_log.append((i, self._ctrl[slot + 1] / 1e9, self._ctrl[slot + 2] / 1e9, nbytes))
        arrays = self._views[count % len(self._slabs)][i]
        self._lent[id(arrays)] = nbytes
        return arrays

    def release(self, arrays) -> None:
        """Give a unit's slab back (its arrays must not be used afterwards)."""
        nbytes = self._lent.pop(id(arrays), None)
        if nbytes is None:
            raise ValueError("release() of a unit this prefetcher did not hand out, or released twice")
        with self._store._lock:
            self._store.resident_bytes -= nbytes
        self._released += 1
        self._lib.stagejax_put(self._plan_ref, RELEASED, self._released)

    def _raise_failure(self):
        code, read = int(self._ctrl[ERROR]), int(self._ctrl[ERROR_READ])
        key = self._read_keys[read]
        entry = self._store._entries[key]
        self.close()
        if code == 1:
            raise CheckpointError(
                f"array {key!r}: {entry.file} ended before {entry.nbytes} bytes (truncated); "
                "delete the checkpoint and convert again")
        raise CheckpointError(f"array {key!r}: reading {entry.file} failed: {os.strerror(-code)}")

    def close(self) -> None:
        """Stop the reader thread (units read ahead and not handed out are dropped)."""
        if self._closed:
            return
        self._closed = True
        self._lib.stagejax_put(self._plan_ref, STOP, 1)
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "NativePrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
