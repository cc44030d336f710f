"""The decoder-only transformer of both families as one Flax module.

Llama: RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or untied head.
GPT-2: LayerNorm, learned positions, GELU MLP, biases everywhere, tied head.

Parameter tree (the names the stage shards and importers use):
  embed/embedding [V, D]; pos_embed/embedding [P, D] (GPT-2)
  L{i}/attn_norm/{scale,bias}; L{i}/q/kernel [D, N, H]; L{i}/k/kernel, L{i}/v/kernel [D, K, H]
  (GPT-2: plus bias [N, H] / [K, H]); L{i}/o/kernel [N, H, D] (+ bias [D]);
  L{i}/ffn_norm/{scale,bias}; L{i}/gate/kernel [D, F] (Llama); L{i}/up/kernel [D, F]
  (+ bias [F]); L{i}/down/kernel [F, D] (+ bias [D]); final_norm/{scale,bias};
  head/kernel [D, V] when the head is not tied.

KV cache: a tuple with one (k_BSKH, v_BSKH) pair per layer, keys stored after RoPE. Tokens at
positions [start, start + T) are written at those cache rows; queries attend every cache row
whose position is not after their own, so rows beyond the written prefix are never read.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from stagejax import ops
from stagejax.model_config import ModelConfig
from stagejax.models.layers import INIT_STDDEV, Einsum, Embed, Norm

KVCache = tuple  # tuple[tuple[k_BSKH, v_BSKH], ...] one pair per layer


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, max_len, config.n_kv_heads, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers))


class Block(nn.Module):
    config: ModelConfig
    kv_dtype: str = "float32"  # the KV cache's storage dtype: keys/values pass its round trip

    def setup(self):
        c = self.config
        gpt2 = c.family == "gpt2"
        norm_kind = "layer" if gpt2 else "rms"
        self.attn_norm = Norm(c.d_model, c.norm_eps, norm_kind)
        self.q = Einsum((c.d_model, c.n_heads, c.head_dim), "BTD,DNH->BTNH",
                        (c.n_heads, c.head_dim) if gpt2 else None)
        self.k = Einsum((c.d_model, c.n_kv_heads, c.head_dim), "BTD,DKH->BTKH",
                        (c.n_kv_heads, c.head_dim) if gpt2 else None)
        self.v = Einsum((c.d_model, c.n_kv_heads, c.head_dim), "BTD,DKH->BTKH",
                        (c.n_kv_heads, c.head_dim) if gpt2 else None)
        self.o = Einsum((c.n_heads, c.head_dim, c.d_model), "BTNH,NHD->BTD",
                        (c.d_model,) if gpt2 else None)
        self.ffn_norm = Norm(c.d_model, c.norm_eps, norm_kind)
        if not gpt2:
            self.gate = Einsum((c.d_model, c.ffn_dim), "BTD,DF->BTF")
        self.up = Einsum((c.d_model, c.ffn_dim), "BTD,DF->BTF", (c.ffn_dim,) if gpt2 else None)
        self.down = Einsum((c.ffn_dim, c.d_model), "BTF,FD->BTD", (c.d_model,) if gpt2 else None)

    def __call__(self, x_BTD, positions_BT, kv=None, start=None):
        c = self.config
        h_BTD = self.attn_norm(x_BTD)
        q_BTNH, k_BTKH, v_BTKH = self.q(h_BTD), self.k(h_BTD), self.v(h_BTD)
        if c.family == "llama":
            q_BTNH = ops.rope(q_BTNH, positions_BT, c.rope_theta)
            k_BTKH = ops.rope(k_BTKH, positions_BT, c.rope_theta)
        # A lossy cache: attention sees what reading the cache back gives, for every token.
        k_BTKH = ops.kv_roundtrip(k_BTKH, self.kv_dtype)
        v_BTKH = ops.kv_roundtrip(v_BTKH, self.kv_dtype)
        if kv is None:
            keys, values, key_positions_BS = k_BTKH, v_BTKH, positions_BT
        else:
            k_cache, v_cache = kv
            keys = jax.lax.dynamic_update_slice(k_cache, k_BTKH.astype(k_cache.dtype), (0, start, 0, 0))
            values = jax.lax.dynamic_update_slice(v_cache, v_BTKH.astype(v_cache.dtype), (0, start, 0, 0))
            kv = (keys, values)
            key_positions_BS = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
        mask_BTS = ops.causal_mask(positions_BT, key_positions_BS)
        attn_BTNH = ops.attention(q_BTNH, keys.astype(q_BTNH.dtype), values.astype(q_BTNH.dtype), mask_BTS)
        x_BTD = x_BTD + self.o(attn_BTNH)

        h_BTD = self.ffn_norm(x_BTD)
        if c.family == "llama":
            x_BTD = x_BTD + ops.swiglu(h_BTD, self.gate.kernel(h_BTD), self.up.kernel(h_BTD),
                                       self.down.kernel(h_BTD))
        else:
            x_BTD = x_BTD + ops.gelu_mlp(h_BTD, self.up.kernel(h_BTD), self.up.bias(),
                                         self.down.kernel(h_BTD)) + self.down.bias()
        return x_BTD, kv


class Decoder(nn.Module):
    """Decoder-only language model. Returns logits [B, T, V] (float32) and the updated cache."""

    config: ModelConfig
    kv_dtype: str = "float32"  # see Block

    def setup(self):
        c = self.config
        self.embed = Embed(c.vocab_size, c.d_model)
        if c.family == "gpt2":
            self.pos_embed = nn.Embed(c.max_seq_len, c.d_model,
                                      embedding_init=nn.initializers.normal(INIT_STDDEV))
        self.layers = [Block(c, self.kv_dtype, name=f"L{i}") for i in range(c.n_layers)]
        self.final_norm = Norm(c.d_model, c.norm_eps, "layer" if c.family == "gpt2" else "rms")
        if not c.tie_embeddings:
            self.head = Einsum((c.d_model, c.vocab_size), "BTD,DV->BTV")

    def __call__(self, tokens_BT, positions_BT=None, kv_cache: KVCache | None = None, start=0):
        """Args:
          tokens_BT: [batch, tokens] int32 token ids.
          positions_BT: absolute positions; defaults to start + arange(T).
          kv_cache: None for a cache-free forward, else the per-layer cache to write and read.
          start: cache row of the first token (a traced int32 is fine).
        """
        if positions_BT is None:
            positions_BT = start + jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD = self.embed(tokens_BT)
        if self.config.family == "gpt2":
            x_BTD = x_BTD + self.pos_embed(positions_BT)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x_BTD, kv = layer(x_BTD, positions_BT, None if kv_cache is None else kv_cache[i], start)
            new_cache.append(kv)
        x_BTD = self.final_norm(x_BTD)
        if self.config.tie_embeddings:
            logits_BTV = self.embed.attend(x_BTD)
        else:
            logits_BTV = self.head(x_BTD)
        return logits_BTV.astype(jnp.float32), (None if kv_cache is None else tuple(new_cache))
