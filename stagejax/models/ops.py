"""The math of the model families, written once as pure functions over arrays.

The Flax modules of this package apply these functions; the staged executor reaches them
through the modules' methods (`models.Block`, `models.Decoder`), and directly only for what
merges partial results — the online softmax over KV blocks and the log-sum-exp over vocabulary
chunks. Nothing here imports anything of stagejax but the KV cache's dtypes.

Einsum alphabet (used across the code base):
  B batch, T query tokens, S key/cache tokens, D model width, N query heads, K kv heads,
  G query heads per kv head (N = K * G), H head dim, F FFN width, V vocab.

Softmax, norms and log-sum-exp run in float32 and cast back to the input dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from stagejax_device.kv_store import KV_DTYPES  # the cache owns its dtypes

# Masked scores use a large finite negative rather than -inf so that a fully masked row
# (possible for padded positions) yields a uniform softmax instead of NaNs.
MASK_VALUE = -1e30


def rms_norm(x, scale, eps: float):
    """RMSNorm (Llama): x / sqrt(mean(x^2) + eps) * scale, computed in float32."""
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv_rms * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x, scale, bias, eps: float):
    """LayerNorm (GPT-2) over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def rope(x_BTnH, positions_BT, theta: float):
    """Rotary position embedding in the rotate-half convention (Hugging Face Llama layout).

    Args:
      x_BTnH: [batch, tokens, heads, head_dim]; heads may be query or kv heads.
      positions_BT: [batch, tokens] integer absolute positions.
      theta: the RoPE base frequency.
    """
    head_dim = x_BTnH.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BTh)[:, :, None, :]
    sin = jnp.sin(angles_BTh)[:, :, None, :]
    x32 = x_BTnH.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BTnH.dtype)


def attention_scores(q_BTNH, k_BKSH):
    """Scaled dot-product scores with grouped-query heads: [B, K, G, T, S] in float32."""
    b, t, n, h = q_BTNH.shape
    k = k_BKSH.shape[1]
    q_BKGTH = q_BTNH.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4).astype(jnp.float32)
    scale = 1.0 / jnp.sqrt(jnp.float32(h))
    return jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH * scale, k_BKSH.astype(jnp.float32))


def causal_mask(q_positions_BT, k_positions_BS):
    """True where a query may attend a key: the key's position is not after the query's."""
    return k_positions_BS[:, None, :] <= q_positions_BT[:, :, None]  # [B, T, S]


def attention_kv_major(q_BTNH, k_BKSH, v_BKSH, mask_BTS):
    """Softmax attention of all query heads over keys/values of their kv group.

    Args:
      q_BTNH: queries, RoPE already applied.
      k_BKSH, v_BKSH: keys (RoPE applied) and values, kv-head major: the contractions batch
        over (B, K), so XLA reads a cache in this layout without transposing it. May also be
        tuples of parts (e.g. a cache and a pass's own keys) with a tuple of masks: one softmax
        over all parts, without concatenating (copying) the keys.
      mask_BTS: boolean, True where attention is allowed (a tuple: one per part).
    Returns:
      [B, T, N, H] in the dtype of q.
    """
    parts = isinstance(k_BKSH, tuple)
    ks, vs, masks = (k_BKSH, v_BKSH, mask_BTS) if parts else ((k_BKSH,), (v_BKSH,), (mask_BTS,))
    b, t, n, h = q_BTNH.shape
    scores = [jnp.where(m[:, None, None, :, :], attention_scores(q_BTNH, k), MASK_VALUE)
              for k, m in zip(ks, masks)]
    sizes = [s.shape[-1] for s in scores]
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1)
    bounds = np.cumsum([0] + sizes)
    out_BKGTH = sum(jnp.einsum("BKGTS,BKSH->BKGTH", probs[..., lo:hi], v.astype(jnp.float32))
                    for lo, hi, v in zip(bounds[:-1], bounds[1:], vs))
    return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_BTNH.dtype)


def attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS):
    """`attention_kv_major` for token-major keys/values [B, S, K, H]."""
    return attention_kv_major(q_BTNH, k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3),
                              mask_BTS)


def output_projection(attn_BTNH, w):
    """Heads' outputs [B, T, N, H] times the output projection (any shape holding [N*H, D]).

    One contraction over the flattened N*H axis: as "BTNH,NHD->BTD", XLA transposed the whole
    weight before every call (a 1.3 MB copy per SmolLM2 layer and step)."""
    b, t, n, h = attn_BTNH.shape
    return jnp.einsum("BTK,KD->BTD", attn_BTNH.reshape(b, t, n * h), w.reshape(n * h, -1))


def swiglu(x_BTD, w_gate_DF, w_up_DF, w_down_FD):
    """Llama FFN: down(silu(gate(x)) * up(x))."""
    gate = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate_DF)
    up = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down_FD)


def gelu_mlp(x_BTD, w_up_DF, b_up_F, w_down_FD):
    """GPT-2 FFN without its output bias (added once by the caller, so chunks can sum)."""
    hidden = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF) + b_up_F
    # GPT-2 uses the tanh approximation of GELU ("gelu_new" in Hugging Face).
    return jnp.einsum("BTF,FD->BTD", jax.nn.gelu(hidden, approximate=True), w_down_FD)


def log_softmax(logits):
    """Log-probabilities in float32."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def logsumexp_update(m_T, s_T, logits_TV):
    """Fold one vocabulary chunk's logits into a running log-sum-exp per token (max `m_T`, sum
    `s_T` of exp(logit - m)): log-probabilities exact across a head's chunks without [T, V]
    at once. Returns (m_T, s_T)."""
    m_new = jnp.maximum(m_T, jnp.max(logits_TV, axis=-1))
    s_new = s_T * jnp.exp(m_T - m_new) + jnp.sum(jnp.exp(logits_TV - m_new[:, None]), axis=-1)
    return m_new, s_new


# Online softmax over key blocks (flash-attention style), for stages that see the KV cache one
# block at a time. The carry holds, per query head and token, the running max `m`, the running
# sum of exp(score - m) `l`, and the running weighted sum of values `acc`; combining blocks in
# any order gives the softmax attention over their union exactly (up to float rounding).

# Query rows per kv group (tokens x queries per group) up to which attention's value sum is a
# multiply-reduce rather than a dot (see online_softmax_update).
FEW_QUERY_ROWS = 8


def online_softmax_init(t: int, n: int, h: int):
    """Empty carry for `t` tokens and `n` query heads of dimension `h`: (m_TN, l_TN, acc_TNH)."""
    return (jnp.full((t, n), MASK_VALUE, jnp.float32), jnp.zeros((t, n), jnp.float32),
            jnp.zeros((t, n, h), jnp.float32))


def online_softmax_update(carry, q_TNH, k_SKH, v_SKH, mask_TS):
    """Fold one block of keys/values into the carry.

    Args:
      carry: (m_TN, l_TN, acc_TNH) float32.
      q_TNH: queries of N heads (RoPE applied); head n uses kv group n // (N // K).
      k_SKH, v_SKH: one block of S keys/values of K kv groups.
      mask_TS: True where query t may attend key s (masked keys contribute nothing).
    """
    m, l, acc = carry
    t, n, h = q_TNH.shape
    k = k_SKH.shape[1]
    q_TKGH = q_TNH.reshape(t, k, n // k, h).astype(jnp.float32) / jnp.sqrt(jnp.float32(h))
    scores_TKGS = jnp.einsum("TKGH,SKH->TKGS", q_TKGH, k_SKH.astype(jnp.float32))
    scores_TNS = scores_TKGS.reshape(t, n, -1)
    mask_T1S = mask_TS[:, None, :]
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask_T1S, scores_TNS, MASK_VALUE), axis=-1))
    # where(), not just the MASK_VALUE trick: a block masked entirely must add exactly zero.
    p_TNS = jnp.where(mask_T1S, jnp.exp(scores_TNS - m_new[..., None]), 0.0)
    correction = jnp.exp(m - m_new)
    l_new = l * correction + jnp.sum(p_TNS, axis=-1)
    p_TKGS = p_TNS.reshape(t, k, n // k, -1)
    if t * (n // k) <= FEW_QUERY_ROWS:
        # A decode step: a multiply-reduce reads the values in place. As a dot, XLA's CPU
        # backend transposed the block to [K, H, S] first (20 of a 40 µs attention call).
        pv_TKGH = jnp.sum(p_TKGS.transpose(0, 3, 1, 2)[..., None]
                          * v_SKH.astype(jnp.float32)[None, :, :, None, :], axis=1)
    else:
        pv_TKGH = jnp.einsum("TKGS,SKH->TKGH", p_TKGS, v_SKH.astype(jnp.float32))
    acc_new = acc * correction[..., None] + pv_TKGH.reshape(t, n, h)
    return m_new, l_new, acc_new


def online_softmax_finish(carry):
    """Attention output [T, N, H] float32 from a carry that saw at least one allowed key per row."""
    _, l, acc = carry
    return acc / l[..., None]


# KV-cache storage dtypes. A lossy cache changes the numbers attention sees, so every path
# (the cache itself, a step's own keys/values, the monolithic model) applies the same round
# trip `kv_roundtrip`, and staged == monolithic still holds to float32 rounding.
INT8_MAX = 127.0


def kv_quantize(x_SKH, dtype: str):
    """Keys or values as stored: (values, scales). float32/bfloat16: a cast, scales None.
    int8: symmetric, one float32 scale per row of H values (one token of one kv head):
    scale = max|x| / 127, values = round(x / scale); |dequantized - x| <= scale / 2."""
    x = x_SKH.astype(jnp.float32)
    if dtype == "float32":
        return x, None
    if dtype == "bfloat16":
        return x.astype(jnp.bfloat16), None
    if dtype != "int8":
        raise ValueError(f"unknown KV dtype {dtype!r}; choose one of {', '.join(KV_DTYPES)}")
    scale = jnp.max(jnp.abs(x), axis=-1) / INT8_MAX
    safe = jnp.where(scale > 0, scale, 1.0)  # an all-zero row stores zeros, not NaNs
    values = jnp.clip(jnp.round(x / safe[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return values, scale


def kv_dequantize(values, scales, dtype: str):
    """float32 keys or values from their stored form (`scales` [..., rows] for int8)."""
    if dtype == "int8":
        return values.astype(jnp.float32) * scales[..., None]
    return values.astype(jnp.float32)


def kv_roundtrip(x, dtype: str):
    """What reading `x` back from a cache of `dtype` gives (identity for float32)."""
    if dtype == "float32":
        return x
    return kv_dequantize(*kv_quantize(x, dtype), dtype).astype(x.dtype)
