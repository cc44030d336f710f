"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling.

Pure functions over a logits vector, so the monolithic decoder and the staged executor (whose
LM head produces the logits chunk by chunk) share one implementation.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits_V, top_k: int, top_p: float):
    """Set logits outside the top-k and outside the top-p nucleus to -inf."""
    logits_V = logits_V.astype(jnp.float32)
    if top_k > 0 and top_k < logits_V.shape[-1]:
        kth_largest = jax.lax.top_k(logits_V, top_k)[0][-1]
        logits_V = jnp.where(logits_V < kth_largest, -jnp.inf, logits_V)
    if top_p < 1.0:
        order = jnp.argsort(-logits_V)
        sorted_logits = logits_V[order]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits))
        # Keep a token if the mass before it is below top_p: the smallest set reaching top_p.
        keep_sorted = (cumulative - jax.nn.softmax(sorted_logits)) < top_p
        keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
        logits_V = jnp.where(keep, logits_V, -jnp.inf)
    return logits_V


def sample_token(logits_V, key, config: SamplingConfig):
    """The next token id (int32 scalar) from one position's logits."""
    if config.greedy:
        return jnp.argmax(logits_V).astype(jnp.int32)
    filtered = filter_logits(logits_V / config.temperature, config.top_k, config.top_p)
    return jax.random.categorical(key, filtered).astype(jnp.int32)
