"""The KV cache on the JAX side: reads in storage form turned into keys and values inside the
attention executables, and a host cache that quantizes lossy dtypes with XLA.

The cache itself — layouts, blocks, files, reads and writes — is `stagejax_device.kv_store`
(no JAX: the device runtime uses it too); its names are re-exported here for the executor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stagejax.models import ops
from stagejax_device import kv_store
from stagejax_device.kv_store import (KV_DTYPES, KV_LOCATIONS, KV_ORDERS, KVLayout,  # noqa: F401
                                      file_system_type, scratch_file,
                                      aligned_empty, cache_capacity, read_bytes,
                                      resident_cache_bytes, stored_row_bytes)


def kv_quantizer(dtype: str):
    """`kv_store.Quantize` for `dtype` in XLA: `ops.kv_quantize` of keys and values stacked
    [T, 2, K, H], the function attention's round trip uses (None for float32)."""
    if dtype == "float32":
        return None
    return jax.jit(lambda k, v: ops.kv_quantize(jnp.stack([k, v], axis=1), dtype))


class HostKVCache(kv_store.HostKVCache):
    """`kv_store.HostKVCache` whose lossy dtypes are quantized by `kv_quantizer`."""

    def __init__(self, config, capacity: int, layout: KVLayout, read_tokens: int | None = None):
        super().__init__(config, capacity, layout, read_tokens, quantize=kv_quantizer(layout.dtype))


def stored_kv(block: tuple, order: str, dtype: str, first_group, n_groups: int):
    """Keys and values [S, n_groups, H] float32 from a read in storage form (traced; used inside
    the attention jits). `block` = (values,) or (values, scales), as `HostKVCache` returns:
    head_major values [n_blocks, n_groups, 2, B, H]; token_major [n_blocks, B, 2, K, H] (all
    groups: `first_group` picks)."""
    values = block[0]
    scales = block[1] if len(block) > 1 else None
    if order == "head_major":
        n_blocks, g, _, b, h = values.shape
        kv = ops.kv_dequantize(values, scales, dtype)  # [n_blocks, g, 2, B, H]
        kv = jnp.transpose(kv, (2, 0, 3, 1, 4)).reshape(2, n_blocks * b, g, h)
    else:
        n_blocks, b, _, k, h = values.shape
        kv = ops.kv_dequantize(values, scales, dtype)  # [n_blocks, B, 2, K, H]
        kv = jnp.transpose(kv, (2, 0, 1, 3, 4)).reshape(2, n_blocks * b, k, h)
        kv = jax.lax.dynamic_slice_in_dim(kv, first_group, n_groups, axis=2)
    return kv[0], kv[1]


def stored_kv_group(block: tuple, order: str, dtype: str, group):
    """Keys and values [S, 1, H] float32 of one kv group (traced `group`) from a whole-layer
    read in storage form: the group is sliced out before dequantizing and transposing, so a
    fused group's attention head touches its own group's rows only. Transposing the whole layer
    per head made XLA materialise one copy of the layer's past per head (9 per SmolLM2 layer)."""
    axis = 1 if order == "head_major" else 3  # values [n, K, 2, B, H] / [n, B, 2, K, H]
    sliced = tuple(jax.lax.dynamic_slice_in_dim(part, group, 1, axis=axis) for part in block)
    return stored_kv(sliced, order, dtype, 0, 1)


