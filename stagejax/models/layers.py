"""Weight-holding Flax layers shared by both families. They hold parameters only; the math
they apply is written at the call site with `stagejax.models.ops` (gemma's `Einsum` pattern).

A matrix parameter may be a `stagejax.quant.QuantizedMatrix` (the stored quantized bytes of a
checkpoint, see `stagejax.store.layout.assemble_params`): the layer dequantizes it inside the
jit, with the same function the stages call, so staged and monolithic runs use equal weights.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from stagejax.models import ops
from stagejax.quant import QuantizedMatrix

# GPT-2's initialisation scale, also used for random Llama-family presets.
INIT_STDDEV = 0.02
# Vocabulary columns dequantized at a time by a quantized tied head: the monolithic jit then
# holds a [D, 8192] float32 temporary (18 MB for SmolLM2) instead of the whole [D, V] (113 MB).
HEAD_DEQUANT_COLUMNS = 8192


def stored_param(module: nn.Module, name: str, init, shape, dtype):
    """`module.param(name, init, shape, dtype)`, checked against the shape without running the
    initializer when the caller's parameters hold it.

    Flax's own check traces the initializer (`jax.eval_shape`) on every apply; a stage applies
    its module once per traced stage, hundreds of times per plan, and that trace was a third of
    a streamed plan's tracing time.
    """
    if not module.has_variable("params", name):
        return module.param(name, init, tuple(shape), dtype)
    value = module.get_variable("params", name)
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{module.name}/{name}: parameter of shape {tuple(value.shape)} given where "
                         f"the model needs {tuple(shape)}; check the checkpoint's config")
    return value


def matrix_param(module: nn.Module, name: str, init, shape, dtype):
    """`stored_param`, or the `QuantizedMatrix` the caller's parameters hold there (its leaves
    have other shapes, so its logical size is checked instead)."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, QuantizedMatrix):
            if value.in_dim * value.out_dim != int(np.prod(shape)):
                raise ValueError(f"{module.name}/{name}: quantized matrix [{value.in_dim}, "
                                 f"{value.out_dim}] does not hold a parameter of shape {tuple(shape)}")
            return value
    return stored_param(module, name, init, shape, dtype)


class Einsum(nn.Module):
    """A weight of `shape` (and optionally a bias of `bias_shape`) applied by `equation`."""

    shape: Sequence[int]
    equation: str
    bias_shape: Sequence[int] | None = None
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self._kernel = matrix_param(self, "kernel", nn.initializers.normal(INIT_STDDEV),
                                    self.shape, self.param_dtype)
        if self.bias_shape is not None:
            self._bias = stored_param(self, "bias", nn.initializers.zeros, self.bias_shape,
                                      self.param_dtype)

    def kernel(self, after=None):
        """The kernel as a float array of `shape` (dequantized if stored quantized, once
        `after` — the activation it multiplies — exists: see `QuantizedMatrix.dequantize`)."""
        if isinstance(self._kernel, QuantizedMatrix):
            return self._kernel.dequantize(after).reshape(tuple(self.shape))
        return self._kernel

    def bias(self):
        return self._bias

    def __call__(self, x):
        y = jnp.einsum(self.equation, x, self.kernel(after=x).astype(x.dtype))
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
        scale = stored_param(self, "scale", nn.initializers.ones, (self.dim,), self.param_dtype)
        if self.kind == "rms":
            return ops.rms_norm(x, scale, self.eps)
        bias = stored_param(self, "bias", nn.initializers.zeros, (self.dim,), self.param_dtype)
        return ops.layer_norm(x, scale, bias, self.eps)


class Embed(nn.Module):
    """Token embedding [V, D] (param "embedding"), also the tied LM head (`attend`).

    Float32: `nn.Embed`'s arithmetic (a row gather; logits = x @ embedding.T). Quantized: the
    parameter is the head's view, a `QuantizedMatrix` [D, V]; a lookup dequantizes only the
    tokens' columns, the head dequantizes `HEAD_DEQUANT_COLUMNS` vocabulary columns at a time.
    """

    num_embeddings: int
    features: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = matrix_param(self, "embedding", nn.initializers.normal(INIT_STDDEV),
                                      (self.num_embeddings, self.features), self.param_dtype)

    def __call__(self, tokens):
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"token ids must be integers, got {tokens.dtype}")
        if isinstance(self.embedding, QuantizedMatrix):
            rows_TD = self.embedding.take_out(tokens.reshape(-1)).dequantize().T
            return rows_TD.reshape(tokens.shape + (self.features,))
        return jnp.take(self.embedding, tokens, axis=0)

    def attend(self, x):
        if isinstance(self.embedding, QuantizedMatrix):
            e = self.embedding
            bounds = list(range(0, e.out_dim, HEAD_DEQUANT_COLUMNS)) + [e.out_dim]
            chunks = [x]  # each chunk dequantized after the previous one's logits: one alive
            for start, stop in zip(bounds[:-1], bounds[1:]):
                chunks.append(jnp.dot(x, e.slice_out(start, stop).dequantize(after=chunks[-1])))
            return jnp.concatenate(chunks[1:], axis=-1)
        # "BTD,VD->BTV", not x @ embedding.T: XLA materialised the transpose (113 MB for
        # SmolLM2) on every call of the latter.
        return jnp.einsum("BTD,VD->BTV", x, self.embedding)
