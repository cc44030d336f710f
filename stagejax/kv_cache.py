"""The KV cache of the staged executor, described as data: location, axis order, block size, dtype.

Rows are token positions. A layer's cache holds keys and values of its K kv groups:
  head_major:  [2 (k, v), K, capacity, H] — a block of one group is one contiguous run
  token_major: [capacity, 2, K, H]        — a block of all groups is one contiguous run
`ram` keeps each layer in a host array; `disk` keeps a file per layer and reads blocks with
`preadv` into reused 64-byte-aligned buffers (no mmap: mapped file pages would count in RSS),
so only the block being attended is resident. Attention stages receive blocks in storage order
and transpose inside their jit.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from stagejax.model_config import ModelConfig
from stagejax.store.weight_store import aligned_empty as aligned_bytes

def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised C-contiguous array on a 64-byte boundary (zero-copy into XLA)."""
    dtype = np.dtype(dtype)
    return aligned_bytes(int(np.prod(shape)) * dtype.itemsize).view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class KVLayout:
    location: str = "ram"  # "ram" | "disk"
    order: str = "head_major"  # "head_major" | "token_major"
    block_tokens: int = 128
    dtype: str = "float32"
    directory: str | None = None  # disk: where the per-layer files go (default: a temp dir)

    def __post_init__(self):
        if self.location not in ("ram", "disk"):
            raise ValueError(f"KV cache location must be 'ram' or 'disk', got {self.location!r}")
        if self.order not in ("head_major", "token_major"):
            raise ValueError(f"cache.order must be head_major or token_major, got {self.order!r}")
        if self.block_tokens <= 0:
            raise ValueError(f"cache block size must be positive, got {self.block_tokens}")
        if self.dtype != "float32":
            raise ValueError(f"KV dtype {self.dtype!r} is not implemented yet (float32 only)")


class HostKVCache:
    """Keys and values of earlier tokens, per layer, in RAM or in files, read block by block."""

    def __init__(self, config: ModelConfig, capacity: int, layout: KVLayout):
        self.config, self.layout = config, layout
        block = layout.block_tokens
        self.capacity = -(-capacity // block) * block  # whole blocks, so every block read fits
        k, h = config.n_kv_heads, config.head_dim
        self.layer_shape = ((2, k, self.capacity, h) if layout.order == "head_major"
                            else (self.capacity, 2, k, h))
        self.itemsize = np.dtype(layout.dtype).itemsize
        self.bytes_read = 0
        self.bytes_written = 0
        self._block_buffers: dict[tuple, np.ndarray] = {}
        self._tmpdir = None
        if layout.location == "ram":
            self._arrays = [np.zeros(self.layer_shape, layout.dtype) for _ in range(config.n_layers)]
        else:
            directory = layout.directory
            if directory is None:
                directory = self._tmpdir = tempfile.mkdtemp(prefix="stagejax-kv-")
            Path(directory).mkdir(parents=True, exist_ok=True)
            layer_bytes = int(np.prod(self.layer_shape)) * self.itemsize
            self._fds = []
            for i in range(config.n_layers):
                fd = os.open(os.path.join(directory, f"kv_L{i}.bin"), os.O_RDWR | os.O_CREAT | os.O_TRUNC)
                os.ftruncate(fd, layer_bytes)
                self._fds.append(fd)

    # ---- sizes -----------------------------------------------------------------------------

    def block_bytes(self, n_groups: int, rows: int) -> int:
        """Bytes of one block (keys and values) of `rows` rows of `n_groups` groups."""
        groups = n_groups if self.layout.order == "head_major" else self.config.n_kv_heads
        return 2 * groups * rows * self.config.head_dim * self.itemsize

    def resident_bytes(self) -> int:
        """Bytes the cache itself holds in RAM (whole cache for `ram`, block buffers for `disk`)."""
        buffers = sum(b.nbytes for b in self._block_buffers.values())
        if self.layout.location == "ram":
            return buffers + sum(a.nbytes for a in self._arrays)
        return buffers

    # ---- writing ---------------------------------------------------------------------------

    def write(self, layer: int, start: int, k_TKH: np.ndarray, v_TKH: np.ndarray) -> None:
        """Store rows [start, start + T) of all kv groups of `layer`."""
        t = k_TKH.shape[0]
        if start + t > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} rows cannot take rows {start}..{start + t}")
        if self.layout.location == "ram":
            a = self._arrays[layer]
            if self.layout.order == "head_major":
                a[0, :, start:start + t] = k_TKH.transpose(1, 0, 2)
                a[1, :, start:start + t] = v_TKH.transpose(1, 0, 2)
            else:
                a[start:start + t, 0] = k_TKH
                a[start:start + t, 1] = v_TKH
        else:
            fd, h = self._fds[layer], self.config.head_dim
            row_bytes = h * self.itemsize
            if self.layout.order == "head_major":
                for which, values in enumerate((k_TKH, v_TKH)):
                    for g in range(values.shape[1]):
                        offset = ((which * self.config.n_kv_heads + g) * self.capacity + start) * row_bytes
                        os.pwrite(fd, np.ascontiguousarray(values[:, g]).data, offset)
            else:
                rows = np.ascontiguousarray(np.stack([k_TKH, v_TKH], axis=1))  # [T, 2, K, H]
                os.pwrite(fd, rows.data, start * rows[0].nbytes)
        self.bytes_written += k_TKH.nbytes + v_TKH.nbytes

    # ---- reading ---------------------------------------------------------------------------

    def read_block(self, layer: int, first_group: int, n_groups: int, start: int, rows: int):
        """Rows [start, start + rows) as one array in storage order:
        head_major [2, n_groups, rows, H]; token_major [rows, 2, K, H] (all groups).

        The returned buffer is reused by the next read of the same shape.
        """
        if self.layout.order == "head_major":
            if self.layout.location == "ram":
                block = self._arrays[layer][:, first_group:first_group + n_groups, start:start + rows]
            else:
                block = self._buffer((2, n_groups, rows, self.config.head_dim))
                row_bytes = self.config.head_dim * self.itemsize
                for which in range(2):
                    for j in range(n_groups):
                        offset = ((which * self.config.n_kv_heads + first_group + j) * self.capacity
                                  + start) * row_bytes
                        self._pread(layer, block[which, j], offset)
        else:
            if self.layout.location == "ram":
                block = self._arrays[layer][start:start + rows]
            else:
                block = self._buffer((rows,) + self.layer_shape[1:])
                self._pread(layer, block, start * int(np.prod(self.layer_shape[1:])) * self.itemsize)
        self.bytes_read += block.nbytes
        return block

    def read_past(self, layer: int, past_len: int):
        """All groups' rows [0, capacity) in storage order, only [0, past_len) read from
        storage (later rows are stale and masked by the attention stage)."""
        rows = self.capacity
        if self.layout.location == "ram":
            block = self._arrays[layer]
        elif self.layout.order == "head_major":
            block = self._buffer(self.layer_shape)
            for which in range(2):
                for g in range(self.config.n_kv_heads):
                    if past_len:
                        self._pread(layer, block[which, g, :past_len],
                                    ((which * self.config.n_kv_heads + g) * rows) *
                                    self.config.head_dim * self.itemsize)
        else:
            block = self._buffer(self.layer_shape)
            if past_len:
                self._pread(layer, block[:past_len], 0)
        read_rows = rows if self.layout.location == "ram" else past_len
        self.bytes_read += 2 * self.config.n_kv_heads * read_rows * self.config.head_dim * self.itemsize
        return block

    def _buffer(self, shape) -> np.ndarray:
        key = tuple(shape)
        if key not in self._block_buffers:
            # Zeroed once: rows past `past_len` are masked, but a masked softmax weight of 0
            # times uninitialised memory can still be NaN. Later reads leave finite KV there.
            buffer = aligned_empty(shape, self.layout.dtype)
            buffer.fill(0)
            self._block_buffers[key] = buffer
        return self._block_buffers[key]

    def _pread(self, layer: int, out: np.ndarray, offset: int) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        n = os.preadv(self._fds[layer], [view], offset)
        if n != out.nbytes:
            raise IOError(f"KV cache file of layer {layer}: short read ({n} of {out.nbytes} bytes)")

    def close(self) -> None:
        if self.layout.location == "disk":
            for fd in self._fds:
                os.close(fd)
            self._fds = []
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
