"""Streaming weights out of a stage-shard checkpoint: `WeightStore` and its `Prefetcher`.

The store opens every array's raw chunk file once and keeps the descriptors. A read is one
`os.preadv` per array straight into a 64-byte-aligned buffer taken from a pool of reusable
buffers (MACHINE_NOTES: fresh buffers page-fault and halved the read rate), so `jax.device_put`
of the result is zero-copy on CPU. No tensorstore or orbax call is on the read path: reading the
chunk files directly was faster (docs/weight_store.md), and the tests check the bytes equal
orbax's own restore.

Lifetime of a buffer: `read`/`read_rows`/`Prefetcher.next` lend arrays; `release` returns them to
the pool. A JAX array made by `device_put` aliases the buffer, so release only after every
computation reading it has finished and the JAX array is no longer used.

Verification (`verify`): "read" checks the checksum of every block a read touches, "open" checks
every block once when the store opens, "off" trusts the files. Sizes are checked on open in all
modes, so a truncated or missing array is always an error naming the array and the file.
"""

from __future__ import annotations

import collections
import os
import resource
import threading
import time
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from stagejax_device.manifest import ArrayInfo, CheckpointError, Manifest, checksum_function, remedy

VERIFY_MODES = ("open", "read", "off")
ALIGN_BYTES = 64  # jax.device_put of a 64-byte-aligned host array is zero-copy on CPU


def aligned_empty(nbytes: int) -> np.ndarray:
    """A new uint8 buffer of `nbytes` whose data pointer is a multiple of ALIGN_BYTES."""
    raw = np.empty(nbytes + ALIGN_BYTES, np.uint8)
    offset = -raw.ctypes.data % ALIGN_BYTES
    return raw[offset:offset + nbytes]


class ZeroWeights:
    """Stands in for a WeightStore and its prefetcher in a dry run (every executable run once
    before any weight is read): zeros of each array's shape, one buffer per shape and dtype,
    shared by every array of that shape; `units` (lists of array keys) handed out in order."""

    def __init__(self, manifest, units: Sequence[Sequence[str]] = ()):
        self.manifest = manifest
        self.units = list(units)
        self._position = 0
        self._zeros: dict[tuple, np.ndarray] = {}

    def zeros(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        key = (tuple(shape), dtype.str)
        if key not in self._zeros:
            array = aligned_empty(int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)
            array.fill(0)
            self._zeros[key] = array
        return self._zeros[key]

    def read_rows(self, key: str, rows) -> np.ndarray:
        info = self.manifest.arrays[key]
        return self.zeros((len(rows),) + tuple(info.shape[1:]), info.dtype)

    def next(self) -> dict:
        unit = self.units[self._position]
        self._position = (self._position + 1) % len(self.units)
        arrays = self.manifest.arrays
        return {k: self.zeros(arrays[k].shape, arrays[k].dtype) for k in unit}

    def release(self, arrays) -> None:
        pass


class _Entry:
    """An array's open file and what reading it needs, resolved once on open."""

    __slots__ = ("key", "fd", "file", "nbytes", "dtype", "shape", "row_bytes", "block_rows",
                 "block_bytes", "checksums")

    def __init__(self, info: ArrayInfo, fd: int, file: str):
        self.key, self.fd, self.file, self.nbytes = info.key, fd, file, info.nbytes
        self.dtype, self.shape = np.dtype(info.dtype), info.shape
        self.row_bytes, self.block_rows = info.row_bytes, info.block_rows
        self.block_bytes, self.checksums = info.block_bytes, info.checksums


class WeightStore:
    """Reads arrays of one checkpoint into pooled, aligned host buffers.

    Args:
      path: the checkpoint directory (from `convert_checkpoint`).
      verify: "read" (check each block read), "open" (check everything once now) or "off".
      expect_config: refuse a checkpoint whose model config differs (a ModelConfig or its dict).
      drop_page_cache: drop the checkpoint's pages from the OS page cache now (cold runs).
      pool_bytes: most bytes of released buffers kept for reuse (None: no limit).
      expect_model: refuse a checkpoint of another model name.

    Attributes (read them, don't set them):
      resident_bytes: bytes lent out of the pool and not released, including units a
        prefetcher has read ahead (its `in_flight_bytes`).
      pool_idle_bytes: bytes of released buffers kept for reuse.
      bytes_read: bytes read from storage so far (weights streamed).
      io_wait_s: time callers spent waiting for data: `read`/`read_rows` calls and the blocking
        part of `Prefetcher.next`.
    """

    def __init__(self, path: str | os.PathLike, verify: str = "read",
                 expect_config=None, drop_page_cache: bool = False,
                 pool_bytes: int | None = None, expect_model: str | None = None):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify={verify!r} is not one of {VERIFY_MODES}")
        self.path = Path(path)
        try:
            self.manifest = Manifest.read(self.path)
        except CheckpointError as error:
            raise CheckpointError(f"{error}; {remedy(self.path)}") from None
        self.manifest.check_matches(expect_config, expect_model)
        self.verify = verify
        self._verify_reads = verify == "read"
        self.checksum = self.manifest.conversion["checksum"]
        self._checksum = checksum_function(self.checksum)
        self.pool_bytes = pool_bytes
        self.resident_bytes = 0
        self.pool_idle_bytes = 0
        self.bytes_read = 0
        self.io_wait_s = 0.0
        self._lock = threading.Lock()
        self._free: dict[int, list[np.ndarray]] = {}
        self._lent: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(array) -> (array, buffer)
        self._entries: dict[str, _Entry] = {}
        self._prefetchers: weakref.WeakSet = weakref.WeakSet()
        _raise_fd_limit(len(self.manifest.arrays) + 256)
        try:
            for key, info in self.manifest.arrays.items():
                self._entries[key] = self._open_array(info)
            if verify == "open":
                self.verify_all()
            if drop_page_cache:
                self.drop_page_cache()
        except CheckpointError as error:  # a damaged checkpoint: say how to replace it
            self.close()
            raise CheckpointError(f"{error}; {remedy(self.path)}") from None
        except BaseException:
            self.close()
            raise

    def _open_array(self, info: ArrayInfo) -> _Entry:
        file = str(self.path / info.file)
        try:
            fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise CheckpointError(f"array {info.key!r} is missing: no file {file}; the checkpoint "
                                  "is incomplete") from None
        size = os.fstat(fd).st_size
        if size != info.nbytes:
            os.close(fd)
            raise CheckpointError(
                f"array {info.key!r}: {file} has {size} bytes, the manifest says {info.nbytes} "
                f"({'truncated' if size < info.nbytes else 'wrong size'}); the checkpoint is "
                "corrupt")
        return _Entry(info, fd, file)

    # -- reading ---------------------------------------------------------------------------

    def nbytes(self, keys: Iterable[str]) -> int:
        """Bytes `read(keys)` returns."""
        return sum(self._entry(key).nbytes for key in keys)

    def read(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The arrays at `keys`, read from storage into aligned pooled buffers (release them)."""
        start = time.perf_counter()
        arrays = self._read_unit(keys)
        wait = time.perf_counter() - start
        with self._lock:
            self.io_wait_s += wait
        return arrays

    def read_rows(self, key: str, rows: Sequence[int]) -> np.ndarray:
        """Rows `rows` of axis 0 of the array at `key`, e.g. one token's embedding row.

        Reads only those rows; with verify="read", the checksum blocks holding them.
        Returns a lent [len(rows), ...] array: release it.
        """
        start = time.perf_counter()
        e = self._entry(key)
        rows = [int(r) for r in rows]
        n_rows = e.shape[0]
        for r in rows:
            if not 0 <= r < n_rows:
                raise IndexError(f"row {r} out of range for {key!r} with {n_rows} rows")
        row_bytes = e.row_bytes
        out = self._take(len(rows) * row_bytes)
        read = 0
        try:
            if not self._verify_reads:
                for j, r in enumerate(rows):
                    self._pread(e, out[j * row_bytes:(j + 1) * row_bytes], r * row_bytes)
                read = len(rows) * row_bytes
            else:
                scratch = self._take(e.block_bytes)
                try:
                    block = -1
                    for j, r in enumerate(rows):
                        if r // e.block_rows != block:
                            block = r // e.block_rows
                            offset = block * e.block_bytes
                            length = min(e.block_bytes, e.nbytes - offset)
                            self._pread(e, scratch[:length], offset)
                            self._check(e, scratch[:length], block)
                            read += length
                        within = (r - block * e.block_rows) * row_bytes
                        out[j * row_bytes:(j + 1) * row_bytes] = scratch[within:within + row_bytes]
                finally:
                    self._give(scratch)
        except BaseException:
            self._give(out)
            raise
        array = out.view(e.dtype).reshape((len(rows),) + tuple(e.shape[1:]))
        wait = time.perf_counter() - start
        with self._lock:
            self._lent[id(array)] = (array, out)
            self.resident_bytes += out.nbytes
            self.bytes_read += read
            self.io_wait_s += wait
        return array

    def release(self, arrays: dict[str, np.ndarray] | Iterable[np.ndarray] | np.ndarray) -> None:
        """Give lent arrays' buffers back to the pool. The arrays must not be used afterwards."""
        if isinstance(arrays, dict):
            arrays = arrays.values()
        elif isinstance(arrays, np.ndarray):
            arrays = (arrays,)
        with self._lock:
            for array in arrays:
                item = self._lent.pop(id(array), None)
                if item is None:
                    raise ValueError("release() of an array this store did not lend, "
                                     "or released twice")
                buffer = item[1]
                n = buffer.nbytes
                self.resident_bytes -= n
                if self.pool_bytes is None or self.pool_idle_bytes + n <= self.pool_bytes:
                    self._free.setdefault(n, []).append(buffer)
                    self.pool_idle_bytes += n

    def prefetcher(self, units: Sequence[Sequence[str]], depth: int,
                   advise_ahead: bool = False) -> "Prefetcher":
        """A reader of `units` in order, cycling forever, `depth` units ahead on a thread."""
        prefetcher = Prefetcher(self, units, depth, advise_ahead)
        self._prefetchers.add(prefetcher)
        return prefetcher

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            if not self._entries:
                raise ValueError(f"{self.path}: the WeightStore is closed") from None
            raise KeyError(f"no array {key!r} in checkpoint {self.path}") from None

    def _read_unit(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """Read without timing (prefetch thread and `read`)."""
        out = {}
        try:
            for key in keys:
                out[key] = self._read_array(self._entry(key))
        except BaseException:
            self.release(out)
            raise
        return out

    def _read_unit_into(self, keys: Sequence[str], offsets: Sequence[int], slab: np.ndarray
                        ) -> dict[str, np.ndarray]:
        """Read a unit's arrays into views of `slab` at `offsets` (prefetcher slabs; these
        arrays are not lent one by one: the prefetcher lends the slab)."""
        out = {}
        read = 0
        for key, offset in zip(keys, offsets):
            e = self._entry(key)
            buffer = slab[offset:offset + e.nbytes]
            self._pread(e, buffer, 0)
            if self._verify_reads:
                self._check(e, buffer, 0)
            out[key] = buffer.view(e.dtype).reshape(e.shape)
            read += e.nbytes
        with self._lock:
            self.bytes_read += read
            self.resident_bytes += read  # until the prefetcher's release() or close()
        return out

    def _read_array(self, e: _Entry) -> np.ndarray:
        buffer = self._take(e.nbytes)
        try:
            self._pread(e, buffer, 0)
            if self._verify_reads:
                self._check(e, buffer, 0)
        except BaseException:
            self._give(buffer)
            raise
        array = buffer.view(e.dtype).reshape(e.shape)
        with self._lock:
            self._lent[id(array)] = (array, buffer)
            self.resident_bytes += e.nbytes
            self.bytes_read += e.nbytes
        return array

    @staticmethod
    def _pread(e: _Entry, buffer: np.ndarray, offset: int) -> None:
        n = os.preadv(e.fd, (buffer,), offset)
        while n < buffer.nbytes:  # short reads: signals, reads over 2 GiB, a file shrunk under us
            more = os.preadv(e.fd, (buffer[n:],), offset + n)
            if more == 0:
                raise CheckpointError(
                    f"array {e.key!r}: {e.file} ended at byte {offset + n}, expected "
                    f"{e.nbytes} bytes (truncated); delete the checkpoint and convert again")
            n += more

    def _check(self, e: _Entry, data: np.ndarray, first_block: int) -> None:
        """Checksum each block of `data`, which starts at block `first_block` of the array."""
        view = memoryview(data)
        step, checksum = e.block_bytes, self._checksum
        for i, start in enumerate(range(0, len(view), step)):
            block = first_block + i
            found = checksum(view[start:start + step])
            if found != e.checksums[block]:
                offset = block * step
                raise CheckpointError(
                    f"array {e.key!r}: {e.file} is corrupt: bytes [{offset}, "
                    f"{min(offset + step, e.nbytes)}) have {self.checksum} {found:#x}, the "
                    f"manifest says {e.checksums[block]:#x}; delete the checkpoint and convert "
                    "again")

    def _take(self, nbytes: int) -> np.ndarray:
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self.pool_idle_bytes -= nbytes
                return free.pop()
        return aligned_empty(nbytes)

    def _give(self, buffer: np.ndarray) -> None:
        with self._lock:
            if self.pool_bytes is None or self.pool_idle_bytes + buffer.nbytes <= self.pool_bytes:
                self._free.setdefault(buffer.nbytes, []).append(buffer)
                self.pool_idle_bytes += buffer.nbytes

    def _add_wait(self, seconds: float) -> None:
        with self._lock:
            self.io_wait_s += seconds

    # -- whole checkpoint ------------------------------------------------------------------

    def warm_read_rate(self, keys: Sequence[str] | None = None) -> float:
        """Bytes per second of reading `keys` (default: every array), in order, each with one
        `os.preadv` into a reused aligned buffer, as the prefetcher reads: one untimed pass
        (it also warms the page cache), then one timed pass. Neither counts in `bytes_read`.

        The page-cache copy rate depends on the files, not only the machine: this checkpoint's
        arrays read at 8-16 GB/s here while one large probe file reads at 21-25 GB/s, so runs
        predict their streaming time from this measurement, not from the calibration's file.
        """
        entries = [self._entry(k) for k in (keys if keys is not None else self.manifest.arrays)]
        buffer = aligned_empty(max((e.nbytes for e in entries), default=ALIGN_BYTES))
        total = sum(e.nbytes for e in entries)
        if not total:
            raise ValueError("warm_read_rate needs at least one non-empty array")
        for timed in (False, True):
            start = time.perf_counter()
            for e in entries:
                self._pread(e, buffer[:e.nbytes], 0)
            seconds = time.perf_counter() - start
        return total / seconds


    def verify_all(self) -> None:
        """Check every block of every array (what verify="open" does); raises CheckpointError."""
        if not self._entries:
            return
        # One scratch buffer, freed afterwards: pooling every size would keep them resident.
        scratch = aligned_empty(max(e.nbytes for e in self._entries.values()))
        for e in self._entries.values():
            self._pread(e, scratch[:e.nbytes], 0)
            self._check(e, scratch[:e.nbytes], 0)
            with self._lock:
                self.bytes_read += e.nbytes

    def drop_page_cache(self) -> None:
        """Evict the checkpoint's files from the OS page cache, so the next reads are cold."""
        for e in self._entries.values():
            os.fdatasync(e.fd)  # only clean pages can be dropped
            os.posix_fadvise(e.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def clear_pool(self) -> None:
        """Free the idle buffers of the pool."""
        with self._lock:
            self._free.clear()
            self.pool_idle_bytes = 0

    def close(self) -> None:
        for prefetcher in list(self._prefetchers):
            prefetcher.close()
        entries, self._entries = self._entries, {}
        for e in entries.values():
            os.close(e.fd)
        self.clear_pool()

    def __enter__(self) -> "WeightStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Failure:
    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Reads units (lists of keys) in order, cycling forever, at most `depth` units ahead.

    A background thread reads unit i+1, ..., i+depth while the caller computes with unit i;
    `next()` hands over the next unit. A unit counts as in flight from when a thread starts
    reading it until `next()` returns it. depth 0: no thread, `next()` reads synchronously.

    `share_reads` (default on): when `next()` would block because its unit is not read yet,
    the calling thread reads the next unit nobody has started (its own, or one further ahead
    while the thread finishes its own) instead of sleeping, within the same depth and slabs.
    Why: on 2 cores the page-cache copies are the slower side of a staged step (SmolLM2 atomic
    ~540 MB/token at 8-12 GB/s), and a consumer that sleeps while they run leaves a core idle.

    `advise_ahead`: before reading a unit, also ask the kernel to start reading the unit after
    it (posix_fadvise WILLNEED), so a cold stream keeps the device busy while Python works.
    """

    def __init__(self, store: WeightStore, units: Sequence[Sequence[str]], depth: int,
                 advise_ahead: bool = False, share_reads: bool = True):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        if not units:
            raise ValueError("a Prefetcher needs at least one unit")
        self._store = store
        self._units = [tuple(unit) for unit in units]
        self._unit_bytes = [store.nbytes(unit) for unit in self._units]  # also checks the keys
        self._unit_fds = [tuple(store._entries[k].fd for k in unit) for unit in self._units]
        self.depth = depth
        self.advise_ahead = advise_ahead
        self.share_reads = share_reads
        # Counts since the start (unit index = count % len(units)), changed under _cv:
        # started = units claimed by a reader; handed = units next() returned.
        # in flight = started - handed <= depth.
        self._started_units = self._started_bytes = 0
        self._handed_units = self._handed_bytes = 0
        self.max_in_flight_units_seen = 0
        self.max_in_flight_bytes_seen = 0
        self.reads_by_consumer = 0  # units next()'s caller read itself (share_reads)
        self._closed = False
        # Set to a list to record (unit index, start, end, bytes) of every read (perf_counter
        # seconds): an instrumented pass's trace. None on timed runs: no cost.
        self.load_log: list | None = None
        self._thread = None
        # Memory: depth + 1 slabs, each as large as the largest unit (arrays 64-byte aligned
        # inside it): the unit being computed with plus `depth` read ahead. Exactly what the
        # plan counts; a pool keyed by array size would keep a buffer of every size resident.
        # Slabs are allocated untouched, so their pages count only once reads fill them.
        self._offsets = []
        slab_bytes = 0
        for unit in self._units:
            offsets, end = [], 0
            for key in unit:
                offsets.append(end)
                end += -(-store._entries[key].nbytes // ALIGN_BYTES) * ALIGN_BYTES
            self._offsets.append(tuple(offsets))
            slab_bytes = max(slab_bytes, end)
        self.slab_bytes = slab_bytes
        # Reused in rotation (first released, first reused), as the queue before shared reads
        # did. Which slabs a large unit lands in then depends only on the cycle's unit count.
        self._free_slabs = collections.deque(
            aligned_empty(max(slab_bytes, ALIGN_BYTES)) for _ in range(depth + 1))
        self._lent_slabs: dict[int, np.ndarray] = {}
        self._lent_bytes: dict[int, int] = {}
        self._cv = threading.Condition(threading.Lock())
        self._done: dict[int, tuple | _Failure] = {}  # count -> (arrays, slab) read, not handed
        # The thread starts now (its stack and state are the runtime's) but reads nothing until
        # the first next(): a unit read during set-up would count in a run's baseline.
        self._reading = False
        if depth:
            self._thread = threading.Thread(target=self._run, name="stagejax-prefetch", daemon=True)
            self._thread.start()

    @property
    def in_flight_units(self) -> int:
        return self._started_units - self._handed_units

    @property
    def in_flight_bytes(self) -> int:
        return self._started_bytes - self._handed_bytes

    def _may_start(self) -> bool:
        return self._started_units - self._handed_units < self.depth and bool(self._free_slabs)

    def _claim(self, ahead: bool = True) -> tuple[int, np.ndarray]:
        """Claim the next unit nobody has started and a slab for it (hold _cv; _may_start()).
        `ahead` False: depth 0's synchronous read, never in flight."""
        count = self._started_units
        self._started_units = count + 1
        self._started_bytes += self._unit_bytes[count % len(self._units)]
        if not ahead:
            return count, self._free_slabs.popleft()
        in_flight = self._started_units - self._handed_units
        if in_flight > self.max_in_flight_units_seen:
            self.max_in_flight_units_seen = in_flight
        in_flight = self._started_bytes - self._handed_bytes
        if in_flight > self.max_in_flight_bytes_seen:
            self.max_in_flight_bytes_seen = in_flight
        return count, self._free_slabs.popleft()

    def _read(self, count: int, slab: np.ndarray) -> tuple | _Failure:
        """Read a claimed unit into `slab` (without holding _cv)."""
        i = count % len(self._units)
        try:
            if self.advise_ahead:
                for fd in self._unit_fds[(i + 1) % len(self._units)]:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            log = self.load_log
            if log is None:
                return self._store._read_unit_into(self._units[i], self._offsets[i], slab), slab
            start = time.perf_counter()
            arrays = self._store._read_unit_into(self._units[i], self._offsets[i], slab)
            log.append((i, start, time.perf_counter(), self._unit_bytes[i]))
            return arrays, slab
        except BaseException as error:  # handed to the consumer by next()
            return _Failure(error)

    def _run(self) -> None:
        cv = self._cv
        while True:
            with cv:
                while not self._closed and not (self._reading and self._may_start()):
                    cv.wait()
                if self._closed:
                    return
                count, slab = self._claim()
            item = self._read(count, slab)
            with cv:
                self._done[count] = item
                cv.notify_all()
            if type(item) is _Failure:
                return

    def next(self) -> dict[str, np.ndarray]:
        """The next unit's arrays (lent: `release` them), in unit order, cycling."""
        if self._closed:
            raise ValueError("Prefetcher is closed")
        cv, done = self._cv, self._done
        with cv:
            if not self._reading:
                self._reading = True
                cv.notify_all()
            count = self._handed_units
            if self._thread is None:  # depth 0: read it now
                count, slab = self._claim(ahead=False)
                start = time.perf_counter()
                item = self._read(count, slab)
                self._store._add_wait(time.perf_counter() - start)
            else:
                item = done.pop(count, None)
                if item is None:
                    start = time.perf_counter()
                    while item is None:
                        if self.share_reads and self._may_start():
                            own, slab = self._claim()
                            cv.release()
                            try:
                                read = self._read(own, slab)
                            finally:
                                cv.acquire()
                            self.reads_by_consumer += 1
                            if own != count:
                                done[own] = read
                                cv.notify_all()
                                item = done.pop(count, None)
                            else:
                                item = read
                        else:
                            cv.wait()
                            item = done.pop(count, None)
                    self._store._add_wait(time.perf_counter() - start)
            i = count % len(self._units)
            if type(item) is _Failure:
                self._closed = True
                cv.notify_all()
            else:
                self._handed_units += 1
                self._handed_bytes += self._unit_bytes[i]
                arrays, slab = item
                self._lent_slabs[id(arrays)] = slab
                self._lent_bytes[id(arrays)] = self._unit_bytes[i]
                cv.notify_all()  # a slot is free
        if type(item) is _Failure:
            self.close()
            raise item.error
        return arrays

    def release(self, arrays) -> None:
        """Give a unit's slab back (its arrays must not be used afterwards)."""
        with self._cv:
            slab = self._lent_slabs.pop(id(arrays), None)
            if slab is None:
                raise ValueError("release() of a unit this prefetcher did not hand out, or "
                                 "released twice")
            with self._store._lock:
                self._store.resident_bytes -= self._lent_bytes.pop(id(arrays))
            self._free_slabs.append(slab)
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the thread and return the units read ahead to the pool."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cv:
            for item in self._done.values():  # units read ahead and never handed over
                if type(item) is not _Failure:
                    with self._store._lock:
                        self._store.resident_bytes -= sum(a.nbytes for a in item[0].values())
            self._done.clear()
            self._handed_units, self._handed_bytes = self._started_units, self._started_bytes

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _raise_fd_limit(needed: int) -> None:
    """Raise the soft open-files limit towards the hard one if `needed` descriptors won't fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
