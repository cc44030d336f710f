"""The KV cache of staged decoding, as host memory or files: location, axis order, block size,
dtype (design §6 `cache/`), shared by the JAX executor and the device runtime.

Rows are token positions, stored in blocks of `block_tokens` rows. A layer's cache is an array
of blocks; inside a block (K kv groups, B = block_tokens rows, H head dim):
  head_major:  [K, 2 (k, v), B, H] — one group's keys and values of a block are one contiguous run
  token_major: [B, 2, K, H]        — all groups of a block are one contiguous run
so a layer is [n_blocks, K, 2, B, H] or [n_blocks, B, 2, K, H]. Stored dtypes: float32,
bfloat16, or int8 with one float32 scale per row of H values (a scales array beside the
values: [n_blocks, K, 2, B] or [n_blocks, B, 2, K]).

`ram` keeps each layer in host arrays; `disk` keeps files per layer (values, and scales for
int8) and reads blocks with `preadv` into reused 64-byte-aligned buffers (no mmap: mapped file
pages would count in RSS), so only the rows being attended are resident. Reads return the
stored form; attention dequantizes and transposes inside its executable
(`stagejax.kv_cache.stored_kv`). Lossy dtypes are written through a `quantize` function the
owner supplies — the very function attention's round trip uses (`stagejax.models.ops.kv_quantize`,
jitted on the JAX side, an exported IREE function on a device) — so this module needs no JAX.

The files have no name (`scratch_file`): nothing is left behind however the process ends.
They go in `KVLayout.directory` (runs: `paths.scratch`), which should be on a disk: on tmpfs a
"disk" cache is RAM after all, and a warning says so.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import warnings
from typing import Callable, NamedTuple

import ml_dtypes
import numpy as np

from stagejax_device.weight_store import aligned_empty as aligned_bytes

KV_LOCATIONS = ("ram", "disk")
KV_ORDERS = ("head_major", "token_major")
KV_DTYPES = ("float32", "bfloat16", "int8")
_NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "int8": np.dtype(np.int8)}


IN_MEMORY_FILE_SYSTEMS = ("tmpfs", "ramfs")
_warned_in_memory: set[str] = set()


def file_system_type(path: str | os.PathLike) -> str | None:
    """The type of the file system holding `path` (from /proc/mounts: the longest mount point
    above it), or None where that cannot be told."""
    real = os.path.realpath(path)
    best, kind = "", None
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fields[2]
    except OSError:
        return None
    return kind


def scratch_file(directory: str | os.PathLike | None, nbytes: int, what: str) -> int:
    """A read-write file of `nbytes` in `directory` (None: the system's temporary directory)
    that has no name, so nothing is left behind when the process ends, however it ends:
    O_TMPFILE where the file system supports it, else a file unlinked as soon as it is open.
    Warns (once per directory) when the directory is in RAM (tmpfs)."""
    directory = str(directory if directory is not None else tempfile.gettempdir())
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise RuntimeError(f"cannot create {directory} for {what} files ({error}); set "
                           "paths.scratch to a writable directory on a disk") from error
    kind = file_system_type(directory)
    if kind in IN_MEMORY_FILE_SYSTEMS and directory not in _warned_in_memory:
        _warned_in_memory.add(directory)
        warnings.warn(f"{what} files go in {directory}, which is on {kind}: that is RAM, not "
                      "disk; set paths.scratch to a directory on a disk", RuntimeWarning,
                      stacklevel=3)
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except (OSError, AttributeError):  # no O_TMPFILE on this file system (or OS)
        fd, name = tempfile.mkstemp(prefix="stagejax-", dir=directory)
        os.unlink(name)
    try:
        os.ftruncate(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    return fd


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array on a 64-byte boundary (zero-copy into XLA)."""
    dtype = np.dtype(dtype)
    return aligned_bytes(int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class KVLayout:
    location: str = "ram"  # "ram" | "disk"
    order: str = "head_major"  # "head_major" | "token_major"
    block_tokens: int = 128  # rows per stored block (the unit of reads)
    dtype: str = "float32"  # "float32" | "bfloat16" | "int8"
    directory: str | None = None  # disk: where the (unnamed) files go; None: the system's temp dir

    def __post_init__(self):
        if self.location not in KV_LOCATIONS:
            raise ValueError(f"KV cache location must be 'ram' or 'disk', got {self.location!r}")
        if self.order not in KV_ORDERS:
            raise ValueError(f"cache.order must be head_major or token_major, got {self.order!r}")
        if self.block_tokens <= 0:
            raise ValueError(f"cache.block_tokens must be positive, got {self.block_tokens}")
        if self.dtype not in KV_DTYPES:
            raise ValueError(f"cache.dtype must be one of {', '.join(KV_DTYPES)}, got {self.dtype!r}")

    @property
    def quantized(self) -> bool:
        """Whether blocks carry a scales array beside the values."""
        return self.dtype == "int8"


class ArraySpec(NamedTuple):
    """Shape and dtype of a read (what an executable's argument for it must be)."""

    shape: tuple[int, ...]
    dtype: np.dtype


# (k [T, K, H], v [T, K, H]) float32 -> (values [T, 2, K, H], scales [T, 2, K] or None)
Quantize = Callable[[np.ndarray, np.ndarray], tuple]


def stored_row_bytes(config, layout: KVLayout, n_groups: int) -> int:
    """Stored bytes (keys, values and their scales) of one row of `n_groups` kv groups.
    `config`: anything with the model's `n_layers`, `n_kv_heads`, `head_dim` (a ModelConfig)."""
    itemsize = _NUMPY_DTYPES[layout.dtype].itemsize
    return n_groups * (2 * config.head_dim * itemsize + (8 if layout.quantized else 0))


def read_bytes(config, layout: KVLayout, n_groups: int, rows: int) -> int:
    """Bytes of one read of `rows` rows for `n_groups` groups (token_major reads all groups)."""
    groups = n_groups if layout.order == "head_major" else config.n_kv_heads
    return rows * stored_row_bytes(config, layout, groups)


def resident_cache_bytes(config, layout: KVLayout, rows: int) -> int:
    """Bytes a cache keeps in RAM for the whole run once `rows` rows are written: every layer's
    rows for `ram` (its arrays are allocated whole, but a page counts only once written), none
    for `disk` (its reads are charged per group)."""
    if layout.location != "ram":
        return 0
    return config.n_layers * rows * stored_row_bytes(config, layout, config.n_kv_heads)


def cache_capacity(capacity: int, read_tokens: int) -> int:
    """Rows a cache allocates for `capacity`: whole reads of `read_tokens`."""
    return -(-capacity // read_tokens) * read_tokens


def _bytes_of(array: np.ndarray) -> memoryview:
    """Raw bytes (bfloat16 arrays do not export a buffer format of their own)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


class HostKVCache:
    """Keys and values of earlier tokens, per layer, in RAM or in files, read block by block.

    Args:
      config: the model's `n_layers`, `n_kv_heads` and `head_dim` (a ModelConfig, or any
        object with those attributes).
      capacity: rows to hold (rounded up to whole reads of `read_tokens`).
      read_tokens: rows per attention read (schedule.kv_block): a multiple of block_tokens.
      quantize: how rows of a lossy dtype are stored (`Quantize`); needed unless float32.
    """

    def __init__(self, config, capacity: int, layout: KVLayout, read_tokens: int | None = None,
                 quantize: Quantize | None = None):
        self.config, self.layout = config, layout
        block = layout.block_tokens
        read_tokens = read_tokens or block
        if read_tokens % block:
            raise ValueError(f"schedule.kv_block={read_tokens} must be a multiple of "
                             f"cache.block_tokens={block}: attention reads whole stored blocks")
        self.read_tokens = read_tokens
        self.capacity = cache_capacity(capacity, read_tokens)  # every read fits
        self.n_blocks = self.capacity // block
        k, h = config.n_kv_heads, config.head_dim
        self.block_shape = (k, 2, block, h) if layout.order == "head_major" else (block, 2, k, h)
        self.layer_shape = (self.n_blocks,) + self.block_shape
        self.np_dtype = _NUMPY_DTYPES[layout.dtype]
        self.itemsize = self.np_dtype.itemsize
        # int8: one float32 scale per stored row of H values.
        self.scale_block_shape = self.block_shape[:-1] if layout.quantized else None
        self.bytes_read = 0
        self.bytes_written = 0
        self._block_buffers: dict[int, np.ndarray] = {}  # part -> bytes of its read buffer
        # The last block read, still in its buffer: GQA heads of one kv group attend the same
        # block one after another (atomic: 3 heads per group on SmolLM2), so they share a read.
        self._last_read: tuple | None = None
        self._read_plans: dict[tuple, tuple] = {}
        self.reads_reused = 0
        if layout.dtype != "float32" and quantize is None:
            raise ValueError(f"a {layout.dtype} KV cache needs the quantize function its reads "
                             "are dequantized with")
        self._quantize = quantize
        if layout.location == "ram":
            self._values = [np.zeros(self.layer_shape, self.np_dtype) for _ in range(config.n_layers)]
            self._scales = ([np.zeros((self.n_blocks,) + self.scale_block_shape, np.float32)
                             for _ in range(config.n_layers)] if layout.quantized else None)
        else:
            self._fds, self._scale_fds = [], None
            try:
                self._fds = [scratch_file(layout.directory, int(np.prod(self.layer_shape)) * self.itemsize,
                                          "KV cache") for _ in range(config.n_layers)]
                if layout.quantized:
                    self._scale_fds = [scratch_file(layout.directory, self.n_blocks * int(np.prod(
                        self.scale_block_shape)) * 4, "KV cache") for _ in range(config.n_layers)]
            except BaseException:
                self.close()
                raise

    # ---- sizes -----------------------------------------------------------------------------

    def row_bytes(self, n_groups: int) -> int:
        return stored_row_bytes(self.config, self.layout, n_groups)

    def block_bytes(self, n_groups: int, rows: int) -> int:
        return read_bytes(self.config, self.layout, n_groups, rows)

    def layer_bytes(self) -> int:
        return self.capacity * self.row_bytes(self.config.n_kv_heads)

    def resident_bytes(self) -> int:
        """Bytes the cache itself holds in RAM (whole cache for `ram`, block buffers for `disk`)."""
        buffers = sum(b.nbytes for b in self._block_buffers.values())
        if self.layout.location == "ram":
            return buffers + self.config.n_layers * self.layer_bytes()
        return buffers

    def specs(self, n_groups: int | None, rows: int) -> tuple[ArraySpec, ...]:
        """Shapes and dtypes of a read of `rows` rows (None groups: a whole-layer read)."""
        n_read = rows // self.layout.block_tokens
        if self.layout.order == "head_major":
            g = self.config.n_kv_heads if n_groups is None else n_groups
            values = (n_read, g) + self.block_shape[1:]
        else:
            values = (n_read,) + self.block_shape
        specs = [ArraySpec(values, self.np_dtype)]
        if self.layout.quantized:
            specs.append(ArraySpec(values[:-1], np.dtype(np.float32)))
        return tuple(specs)

    # ---- writing ---------------------------------------------------------------------------

    def write(self, layer: int, start: int, k_TKH, v_TKH) -> None:
        """Store rows [start, start + T) of all kv groups of `layer` (float32 in; a lossy dtype
        through the cache's `quantize`, the same function attention's round trip uses)."""
        t = k_TKH.shape[0]
        self._last_read = None
        if start + t > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} rows cannot take rows {start}..{start + t}")
        if self.layout.dtype == "float32":
            values, scales = np.stack([np.asarray(k_TKH), np.asarray(v_TKH)], axis=1), None
        else:
            values, scales = self._quantize(k_TKH, v_TKH)
            values = np.asarray(values)  # [T, 2, K, H]
            scales = None if scales is None else np.asarray(scales)  # [T, 2, K]
        b = self.layout.block_tokens
        row = start
        while row < start + t:  # one stored block at a time
            blk, r0 = divmod(row, b)
            n = min(b - r0, start + t - row)
            part = slice(row - start, row - start + n)
            self._write_rows(layer, blk, r0, values[part], None if scales is None else scales[part])
            row += n
        self.bytes_written += t * self.row_bytes(self.config.n_kv_heads)

    def _write_rows(self, layer, blk, r0, values_n2KH, scales_n2K):
        n = values_n2KH.shape[0]
        head_major = self.layout.order == "head_major"
        if head_major:  # block [K, 2, B, H] (scales [K, 2, B])
            values = values_n2KH.transpose(2, 1, 0, 3)
            scales = None if scales_n2K is None else scales_n2K.transpose(2, 1, 0)
        else:  # block [B, 2, K, H]
            values, scales = values_n2KH, scales_n2K
        if self.layout.location == "ram":
            if head_major:
                self._values[layer][blk, :, :, r0:r0 + n] = values
                if scales is not None:
                    self._scales[layer][blk, :, :, r0:r0 + n] = scales
            else:
                self._values[layer][blk, r0:r0 + n] = values
                if scales is not None:
                    self._scales[layer][blk, r0:r0 + n] = scales
            return
        targets = [(self._fds[layer], values, self.itemsize)]
        if scales is not None:
            targets.append((self._scale_fds[layer], scales, 4))
        for fd, data, itemsize in targets:
            if head_major:  # one contiguous run of n rows per (group, k|v)
                k, two, _ = data.shape[:3]
                tail = int(np.prod(data.shape[3:]))  # H for values, 1 for scales
                for g in range(k):
                    for w in range(two):
                        offset = (((blk * k + g) * 2 + w) * self.layout.block_tokens + r0) * tail * itemsize
                        os.pwrite(fd, _bytes_of(data[g, w, :n]), offset)
            else:  # rows are contiguous across the block boundary in this order
                row_items = int(np.prod(data.shape[1:]))
                offset = (blk * self.layout.block_tokens + r0) * row_items * itemsize
                os.pwrite(fd, _bytes_of(data), offset)

    # ---- reading ---------------------------------------------------------------------------

    def read_block(self, layer: int, first_group: int, n_groups: int, start: int, rows: int) -> tuple:
        """Rows [start, start + rows) (whole stored blocks) in storage form: (values,) or
        (values, scales); head_major values [rows/B, n_groups, 2, B, H], token_major
        [rows/B, B, 2, K, H] (all groups). Buffers are reused by the next read of that shape."""
        key = (layer, first_group, n_groups, start, rows)
        if self._last_read is not None and self._last_read[0] == key:
            self.reads_reused += 1
            return self._last_read[1]
        b = self.layout.block_tokens
        if start % b or rows % b:
            raise ValueError(f"KV reads cover whole blocks of {b} rows, got rows {start}..{start + rows}")
        first, n_read = start // b, rows // b
        if self.layout.order == "head_major":
            group_slice = slice(first_group, first_group + n_groups)
        else:
            group_slice = slice(None)
        out = []
        sources = [(self._values if self.layout.location == "ram" else self._fds, self.np_dtype)]
        if self.layout.quantized:
            sources.append((self._scales if self.layout.location == "ram" else self._scale_fds,
                            np.dtype(np.float32)))
        for which, (source, dtype) in enumerate(sources):
            if self.layout.location == "ram":
                part = source[layer][first:first + n_read, group_slice]
            else:
                part, block_bytes, group_bytes = self._read_plan(n_groups, rows, which, dtype)
                if self.layout.order == "head_major" and n_groups != self.config.n_kv_heads:
                    for i in range(n_read):
                        self._pread(source[layer], part[i],
                                    (first + i) * block_bytes + first_group * group_bytes)
                else:  # whole blocks: one contiguous run
                    self._pread(source[layer], part, first * block_bytes)
            out.append(part)
        self.bytes_read += sum(p.nbytes for p in out)
        out = tuple(out)
        self._last_read = (key, out) if self.layout.location == "disk" else None
        return out

    def read_past(self, layer: int, past_len: int) -> tuple:
        """The whole layer in storage form (a whole-layer `read_block`), only the blocks
        holding rows [0, past_len) read from storage; later rows are stale and masked by the
        attention stage."""
        self._last_read = None  # the whole-layer buffer may be a block buffer too
        if self.layout.location == "ram":
            out = (self._values[layer],) + ((self._scales[layer],) if self.layout.quantized else ())
            self.bytes_read += self.layer_bytes()
            return out
        b = self.layout.block_tokens
        n_read = -(-past_len // b)
        out = []
        fds = [self._fds] + ([self._scale_fds] if self.layout.quantized else [])
        for which, (spec, fds_) in enumerate(zip(self.specs(None, self.capacity), fds)):
            part = self._buffer(spec.shape, spec.dtype, which)
            if n_read:
                self._pread(fds_[layer], part[:n_read], 0)
            out.append(part)
            self.bytes_read += part[:n_read].nbytes
        return tuple(out)

    def _read_plan(self, n_groups: int, rows: int, which: int, dtype) -> tuple:
        """(buffer, stored bytes per block, per kv group in a block) of a read shape; cached:
        the hot loop reads the same few shapes thousands of times a step."""
        key = (n_groups, rows, which)
        plan = self._read_plans.get(key)
        if plan is None:
            shape = self.specs(n_groups, rows)[which].shape
            block_shape = self.block_shape if which == 0 else self.scale_block_shape
            block_bytes = int(np.prod(block_shape)) * np.dtype(dtype).itemsize
            plan = (self._buffer(shape, dtype, which), block_bytes, block_bytes // self.config.n_kv_heads)
            self._read_plans[key] = plan
        return plan

    def _buffer(self, shape, dtype, which: int) -> np.ndarray:
        """A view of shape `shape` over the read buffer of part `which` (values, scales).

        One buffer per part, grown to the largest read so far and reused by every read: what
        stays resident between reads is the largest read (the plan charges exactly that to
        every group, `scheduler.MemoryModel`), not one buffer per read shape.
        """
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        buffer = self._block_buffers.get(which)
        if buffer is None or buffer.nbytes < nbytes:
            # Zeroed once: rows past `past_len` are masked, but a masked softmax weight of 0
            # times uninitialised memory can still be NaN. Later reads leave finite KV there.
            buffer = aligned_bytes(nbytes)
            buffer.fill(0)
            self._block_buffers[which] = buffer
            self._read_plans.clear()  # they hold views of the buffer this one replaces
            self._last_read = None
        return buffer[:nbytes].view(dtype).reshape(shape)

    def _pread(self, fd: int, out: np.ndarray, offset: int) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        n = os.preadv(fd, [view], offset)
        if n != out.nbytes:
            raise IOError(f"KV cache file: short read ({n} of {out.nbytes} bytes at offset {offset})")

    def close(self) -> None:
        if self.layout.location == "disk":
            for fd in self._fds + (self._scale_fds or []):
                os.close(fd)
            self._fds, self._scale_fds = [], None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
