"""Activations in external memory (`schedule.activations=disk`): the staged-generation
article's flash round trip. Between groups every activation entry lives in a file; a group
reads the entries it uses, runs, and writes back the ones it wrote, so only one group's
inputs and outputs are ever resident.

One file, one fixed slot per (pass shape, entry): offsets are assigned on first use. Reads go
into reused 64-byte-aligned buffers (`preadv`), writes come from the group's outputs. The file
has no name (`kv_cache.scratch_file`), so nothing is left behind however the process ends.
"""

from __future__ import annotations

import os

import numpy as np

from stagejax_device.kv_store import aligned_empty, scratch_file


class ActivationStore:
    """Args: directory: where the (unnamed) file goes (runs: `paths.scratch`); None: the
    system's temporary directory."""

    def __init__(self, directory: str | None = None):
        self.path = f"an unnamed file in {directory or 'the temporary directory'}"
        self._fd = scratch_file(directory, 0, "activation")
        self._slots: dict[tuple, tuple[int, tuple, np.dtype]] = {}  # key -> (offset, shape, dtype)
        self._end = 0
        self._buffers: dict[tuple, np.ndarray] = {}
        self.bytes_read = 0
        self.bytes_written = 0

    def write(self, key: tuple, array) -> None:
        array = np.asarray(array)
        slot = self._slots.get(key)
        if slot is None:
            slot = (self._end, array.shape, array.dtype)
            self._slots[key] = slot
            self._end += -(-array.nbytes // 64) * 64
        offset, shape, dtype = slot
        if array.shape != shape or array.dtype != dtype:
            raise ValueError(f"activation {key} changed from {shape} {dtype} to {array.shape} {array.dtype}")
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        written = os.pwrite(self._fd, data.data, offset)
        if written != data.nbytes:
            raise IOError(f"activation file {self.path}: short write of {key} ({written} of {data.nbytes} bytes)")
        self.bytes_written += data.nbytes

    def read(self, key: tuple) -> np.ndarray:
        """The entry's bytes in a reused buffer (valid until the next read of the same key)."""
        try:
            offset, shape, dtype = self._slots[key]
        except KeyError:
            raise KeyError(f"activation {key} was never written") from None
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = aligned_empty(shape, dtype)
        view = memoryview(buffer.reshape(-1).view(np.uint8))
        n = os.preadv(self._fd, [view], offset)
        if n != buffer.nbytes:
            raise IOError(f"activation file {self.path}: short read of {key} ({n} of {buffer.nbytes} bytes)")
        self.bytes_read += buffer.nbytes
        return buffer

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
