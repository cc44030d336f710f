"""Batches of token windows for training and evaluation, with a resumable data position.

Training: the train split's ids are cut into non-overlapping windows of `seq_len + 1` tokens
(stride `seq_len`: a window's last token is the next window's first, so every token but the very
first is a target exactly once per epoch). Each epoch visits the windows in a fresh random order
drawn from a numpy PCG64 generator; a batch is the next `batch_size` windows of that order. The
sampler's whole state — epoch, cursor into the order, and the generator's state at the start of
the epoch — is a small JSON-able dict, so a restored sampler continues with exactly the batches
the uninterrupted run would have seen.

Evaluation: the same windows of a split in order (the first `max_tokens` targets' worth), in
fixed-size batches; the last batch is padded and its padding masked out of the loss.
"""

from __future__ import annotations

import numpy as np


def n_windows(n_tokens: int, seq_len: int) -> int:
    """Windows of `seq_len` targets in a stream of `n_tokens` ids (stride `seq_len`)."""
    return max(0, (n_tokens - 1) // seq_len)


def window_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int):
    """Inputs and targets [len(starts), seq_len] int32 of the windows starting at `starts`."""
    index = starts[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    window = np.asarray(tokens[index], dtype=np.int32)
    return window[:, :-1], window[:, 1:]


class BatchSampler:
    """Random-order, epoch-based batches of training windows; `state()`/`restore()` resume it."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.n_windows = n_windows(len(tokens), seq_len)
        if self.n_windows < batch_size:
            raise ValueError(f"the training split has {self.n_windows} windows of {seq_len} "
                             f"tokens, fewer than one batch of {batch_size}; lower "
                             "data.batch_size or data.seq_len")
        self._start_epoch(0, np.random.default_rng(seed).bit_generator.state)

    def _start_epoch(self, epoch: int, rng_state: dict) -> None:
        self.epoch, self.cursor = epoch, 0
        rng = np.random.default_rng()
        rng.bit_generator.state = rng_state
        self._epoch_rng_state = rng_state
        self._order = rng.permutation(self.n_windows)
        self._next_rng_state = rng.bit_generator.state

    def next(self):
        """The next batch: (inputs, targets), each [batch_size, seq_len] int32. An epoch's
        trailing windows that do not fill a batch are skipped (a fresh order follows)."""
        if self.cursor + self.batch_size > self.n_windows:
            self._start_epoch(self.epoch + 1, self._next_rng_state)
        starts = self._order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return window_batch(self.tokens, starts, self.seq_len)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "rng": self._epoch_rng_state,
                "n_windows": self.n_windows, "batch_size": self.batch_size,
                "seq_len": self.seq_len}

    def restore(self, state: dict) -> None:
        for key in ("n_windows", "batch_size", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the checkpoint's data position was saved with {key}="
                                 f"{state[key]}, this run has {getattr(self, key)}: it belongs "
                                 "to a different data setting; use a new run directory")
        self._start_epoch(state["epoch"], state["rng"])
        self.cursor = state["cursor"]


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, max_tokens: int | None = None):
    """The split's windows in order as fixed-shape batches (inputs, targets, weights).

    Weights are 1 for real windows and 0 for the padding of the last batch, so every batch has
    one shape (one compiled executable) and padding never counts.
    """
    count = n_windows(len(tokens), seq_len)
    if max_tokens is not None:
        count = min(count, max(1, max_tokens // seq_len))
    if count == 0:
        raise ValueError(f"a split of {len(tokens)} tokens has no window of {seq_len} targets")
    for first in range(0, count, batch_size):
        starts = np.arange(first, min(first + batch_size, count))
        inputs, targets = window_batch(tokens, starts, seq_len)
        weights = np.ones(len(starts), np.float32)
        pad = batch_size - len(starts)
        if pad:
            inputs = np.pad(inputs, ((0, pad), (0, 0)))
            targets = np.pad(targets, ((0, pad), (0, 0)))
            weights = np.pad(weights, (0, pad))
        yield inputs, targets, weights
