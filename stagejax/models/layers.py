"""Weight-holding Flax layers shared by both families. They hold parameters only; the math
they apply is written at the call site with `stagejax.ops` (gemma's `Einsum` pattern)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from stagejax import ops

# GPT-2's initialisation scale, also used for random Llama-family presets.
INIT_STDDEV = 0.02


class Einsum(nn.Module):
    """A weight of `shape` (and optionally a bias of `bias_shape`) applied by `equation`."""

    shape: Sequence[int]
    equation: str
    bias_shape: Sequence[int] | None = None
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self._kernel = self.param("kernel", nn.initializers.normal(INIT_STDDEV), tuple(self.shape),
                                  self.param_dtype)
        if self.bias_shape is not None:
            self._bias = self.param("bias", nn.initializers.zeros, tuple(self.bias_shape),
                                    self.param_dtype)

    def kernel(self):
        return self._kernel

    def bias(self):
        return self._bias

    def __call__(self, x):
        y = jnp.einsum(self.equation, x, self._kernel.astype(x.dtype))
        if self.bias_shape is not None:
            y = y + self._bias.astype(x.dtype)
        return y


class Norm(nn.Module):
    """Holds a norm's scale (and bias for LayerNorm); `kind` picks the math."""

    dim: int
    eps: float
    kind: str  # "rms" or "layer"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.dim,), self.param_dtype)
        if self.kind == "rms":
            return ops.rms_norm(x, scale, self.eps)
        bias = self.param("bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
        return ops.layer_norm(x, scale, bias, self.eps)
