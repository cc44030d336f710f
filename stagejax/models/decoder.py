"""The decoder-only transformer as Flax modules, configured by its family's switches
(`stagejax.models.family`: norm, biases, rotary or learned positions, SwiGLU or GELU FFN).

Parameter tree (the names the stage shards and importers use):
  embed/embedding [V, D]; pos_embed/embedding [P, D] (learned positions)
  L{i}/attn_norm/{scale,bias}; L{i}/q/kernel [D, N, H]; L{i}/k/kernel, L{i}/v/kernel [D, K, H]
  (with biases: plus bias [N, H] / [K, H]); with QK-norm: L{i}/q_norm/scale [H],
  L{i}/k_norm/scale [H]; L{i}/o/kernel [N, H, D] (+ bias [D]);
  L{i}/ffn_norm/{scale,bias}; L{i}/gate/kernel [D, F] (SwiGLU); L{i}/up/kernel [D, F]
  (+ bias [F]); L{i}/down/kernel [F, D] (+ bias [D]); mixture of experts: L{i}/router/kernel
  [D, E] and gate/up [E, D, F], down [E, F, D]; final_norm/{scale,bias};
  head/kernel [D, V] when the head is not tied.

KV cache: a tuple with one (k_BKSH, v_BKSH) pair per layer, keys stored after RoPE — kv-head
major, so attention's batched contractions read it in place (token-major [B, S, K, H] made XLA
transpose every layer's cache on every step). Tokens at positions [start, start + T) are
written at those cache rows; queries attend every cache row
whose position is not after their own, so rows beyond the written prefix are never read.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from stagejax.models import moe, ops
from stagejax.model_config import ModelConfig
from stagejax.models.layers import INIT_STDDEV, Einsum, Embed, Norm

KVCache = tuple  # tuple[tuple[k_BSKH, v_BSKH], ...] one pair per layer


def init_kv_cache(config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    shape = (batch, config.n_kv_heads, max_len, config.head_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.n_layers))


def write_kv_rows(cache: KVCache, rows, start) -> KVCache:
    """The cache with each layer's new (k_BKTH, v_BKTH) rows written at row `start`.

    Run in its own executable with the cache donated, these are in-place writes. XLA's CPU
    backend copies a donated buffer that one executable both reads and updates (twice per
    array: every layer's cache, ~4 ms of a 22 ms SmolLM2 step), so the step reads the cache
    and returns the rows, and this writes them.
    """
    return tuple(tuple(jax.lax.dynamic_update_slice(c, r.astype(c.dtype), (0, 0, start, 0))
                       for c, r in zip(layer_cache, layer_rows))
                 for layer_cache, layer_rows in zip(cache, rows))


class Block(nn.Module):
    """One transformer layer. Its methods are the computations the stages run, each over a
    slice of the layer's parameters (`heads`, `kv_heads`, `ffn_width` say how much of the layer
    this instance holds; by default all of it); `__call__` is the whole layer built from them."""

    config: ModelConfig
    kv_dtype: str = "float32"  # the KV cache's storage dtype: keys/values pass its round trip
    heads: int | None = None  # query heads of `q` (default: config.n_heads)
    kv_heads: int | None = None  # kv heads of `k` and `v` (default: config.n_kv_heads)
    ffn_width: int | None = None  # FFN columns of gate/up/down (default: config.ffn_dim)
    ffn_down_bias: bool = True  # families with biases: the down bias (once per layer, not per chunk)

    def setup(self):
        c, family = self.config, self.config.traits
        n = self.heads or c.n_heads
        k = self.kv_heads or c.n_kv_heads
        f = self.ffn_width or c.ffn_dim
        bias = lambda *shape: shape if family.biases else None  # noqa: E731
        self.attn_norm = Norm(c.d_model, c.norm_eps, family.norm)
        self.q = Einsum((c.d_model, n, c.head_dim), "BTD,DNH->BTNH", bias(n, c.head_dim))
        self.k = Einsum((c.d_model, k, c.head_dim), "BTD,DKH->BTKH", bias(k, c.head_dim))
        self.v = Einsum((c.d_model, k, c.head_dim), "BTD,DKH->BTKH", bias(k, c.head_dim))
        if family.qk_norm:  # one scale per head dimension, shared by every head
            self.q_norm = Norm(c.head_dim, c.norm_eps, family.norm)
            self.k_norm = Norm(c.head_dim, c.norm_eps, family.norm)
        self.o = Einsum((c.n_heads, c.head_dim, c.d_model), "BTNH,NHD->BTD", bias(c.d_model))
        self.ffn_norm = Norm(c.d_model, c.norm_eps, family.norm)
        if c.is_moe:  # E experts side by side; the router picks K per token
            e = c.n_experts
            self.router = Einsum((c.d_model, e), "BTD,DE->BTE")
            self.gate = Einsum((e, c.d_model, f), "BTD,EDF->BTEF")
            self.up = Einsum((e, c.d_model, f), "BTD,EDF->BTEF")
            self.down = Einsum((e, f, c.d_model), "BTEF,EFD->BTED")
            return
        if family.gated_ffn:
            self.gate = Einsum((c.d_model, f), "BTD,DF->BTF")
        self.up = Einsum((c.d_model, f), "BTD,DF->BTF", bias(f))
        self.down = Einsum((f, c.d_model), "BTF,FD->BTD",
                           bias(c.d_model) if self.ffn_down_bias else None)

    # ---- the computations a stage runs ------------------------------------------------------

    def attention_input(self, x_BTD):
        return self.attn_norm(x_BTD)

    def queries(self, h_BTD, positions_BT):
        """This instance's query heads, normed per head (QK-norm) and RoPE applied:
        [B, T, heads, H]."""
        q_BTnH = self.q(h_BTD)
        if self.config.traits.qk_norm:
            q_BTnH = self.q_norm(q_BTnH)
        return self._rotate(q_BTnH, positions_BT)

    def keys(self, h_BTD, positions_BT):
        """This instance's kv heads' keys, normed per head (QK-norm) and RoPE applied:
        [B, T, kv_heads, H]."""
        k_BTKH = self.k(h_BTD)
        if self.config.traits.qk_norm:
            k_BTKH = self.k_norm(k_BTKH)
        return self._rotate(k_BTKH, positions_BT)

    def values(self, h_BTD):
        return self.v(h_BTD)

    def _rotate(self, x_BTnH, positions_BT):
        if self.config.traits.rope:
            return ops.rope(x_BTnH, positions_BT, self.config.rope_theta)
        return x_BTnH

    def cached(self, x):
        """Keys or values as a later step reads them back from the cache (a lossy cache's
        round trip)."""
        return ops.kv_roundtrip(x, self.kv_dtype)

    def attend_block(self, carry, q_TnH, k_SKH, v_SKH, mask_TS):
        """Fold one block of keys/values into the online-softmax `carry` of heads `q_TnH`
        (staged attention reads the cache block by block; `ops.online_softmax_*`)."""
        return ops.online_softmax_update(carry, q_TnH, k_SKH, v_SKH, mask_TS)

    def attention_output(self, attn_BTNH):
        """The output projection of every head: the residual's update [B, T, D]."""
        y_BTD = ops.output_projection(attn_BTNH, self.o.kernel(after=attn_BTNH))
        return y_BTD + self.o.bias() if self.config.traits.biases else y_BTD

    def ffn_input(self, x_BTD):
        return self.ffn_norm(x_BTD)

    def ffn(self, h_BTD):
        """The FFN over this instance's columns: the residual's update [B, T, D] (chunks'
        updates sum to the whole FFN's)."""
        if self.config.is_moe:
            return self.experts(h_BTD)
        if self.config.traits.gated_ffn:
            return ops.swiglu(h_BTD, self.gate.kernel(h_BTD), self.up.kernel(h_BTD),
                              self.down.kernel(h_BTD))
        y_BTD = ops.gelu_mlp(h_BTD, self.up.kernel(h_BTD), self.up.bias(), self.down.kernel(h_BTD))
        return y_BTD + self.down.bias() if self.ffn_down_bias and self.config.traits.biases else y_BTD

    def experts(self, h_BTD):
        """The mixture-of-experts FFN: each token through its K routed experts (`models.moe`).
        Sows the layer's load-balancing loss in the "intermediates" collection (read by training
        with `mutable=["intermediates"]`; ignored otherwise)."""
        b, t, d = h_BTD.shape
        h_TD = h_BTD.reshape(b * t, d)
        experts_TK, gates_TK, probs_TE = moe.route(self.router(h_TD[None])[0],
                                                   self.config.experts_per_token)
        self.sow("intermediates", "load_balancing_loss", moe.load_balancing_loss(probs_TE, experts_TK))
        y_TD = moe.expert_swiglu(h_TD, experts_TK, gates_TK, self.gate.kernel(), self.up.kernel(),
                                 self.down.kernel())
        return y_TD.reshape(b, t, d)

    # ---- the whole layer ------------------------------------------------------------------------

    def __call__(self, x_BTD, positions_BT, kv=None, start=None, rows_only=False):
        h_BTD = self.attention_input(x_BTD)
        q_BTNH = self.queries(h_BTD, positions_BT)
        # A lossy cache: attention sees what reading the cache back gives, for every token.
        k_BTKH = self.cached(self.keys(h_BTD, positions_BT))
        v_BTKH = self.cached(self.values(h_BTD))
        k_BKTH, v_BKTH = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)
        own_mask_BTT = ops.causal_mask(positions_BT, positions_BT)
        if kv is None:
            attn_BTNH = ops.attention_kv_major(q_BTNH, k_BKTH, v_BKTH, own_mask_BTT)
        else:
            # Attention reads the cache as it was (rows before `start`) plus this pass's own
            # keys; the cache is written afterwards. With `rows_only` the layer returns just the
            # new rows and the caller writes them in a separate executable (see `write_kv_rows`).
            k_cache, v_cache = kv
            rows_BS = jnp.broadcast_to(jnp.arange(k_cache.shape[2]), (x_BTD.shape[0], k_cache.shape[2]))
            past_mask_BTS = jnp.broadcast_to((rows_BS < start)[:, None, :],
                                             (x_BTD.shape[0], x_BTD.shape[1], k_cache.shape[2]))
            attn_BTNH = ops.attention_kv_major(
                q_BTNH, (k_cache.astype(q_BTNH.dtype), k_BKTH), (v_cache.astype(q_BTNH.dtype), v_BKTH),
                (past_mask_BTS, own_mask_BTT))
            rows = (k_BKTH.astype(k_cache.dtype), v_BKTH.astype(v_cache.dtype))
            kv = rows if rows_only else write_kv_rows(((k_cache, v_cache),), (rows,), start)[0]
        x_BTD = x_BTD + self.attention_output(attn_BTNH)
        x_BTD = x_BTD + self.ffn(self.ffn_input(x_BTD))
        return x_BTD, kv


class Decoder(nn.Module):
    """Decoder-only language model. Returns logits [B, T, V] (float32) and the updated cache.

    `vocab_rows`: how many vocabulary rows this instance's embedding (and head) holds, by
    default the whole vocabulary; a stage applies `embed_tokens` to the rows it read and
    `logits` to one chunk of the head."""

    config: ModelConfig
    kv_dtype: str = "float32"  # see Block
    vocab_rows: int | None = None
    position_rows: int | None = None  # learned position rows held (default: max_seq_len)
    # False: an instance for the embedding, final norm and head alone (a stage's), without
    # the layers' modules (setting up 30 `Block`s per head chunk traced cost SmolLM2 ~1 s).
    with_layers: bool = True

    def setup(self):
        c = self.config
        rows = self.vocab_rows or c.vocab_size
        self.embed = Embed(rows, c.d_model)
        if c.traits.learned_positions:
            self.pos_embed = nn.Embed(self.position_rows or c.max_seq_len, c.d_model,
                                      embedding_init=nn.initializers.normal(INIT_STDDEV))
        self.layers = ([Block(c, self.kv_dtype, name=f"L{i}") for i in range(c.n_layers)]
                       if self.with_layers else [])
        self.final_norm = Norm(c.d_model, c.norm_eps, c.traits.norm)
        if not c.tie_embeddings:
            self.head = Einsum((c.d_model, rows), "BTD,DV->BTV")

    def embed_tokens(self, tokens_BT, positions_BT):
        """The residual stream's start [B, T, D]: token embeddings (+ learned positions)."""
        x_BTD = self.embed(tokens_BT)
        if self.config.traits.learned_positions:
            x_BTD = x_BTD + self.pos_embed(positions_BT)
        return x_BTD

    def final(self, x_BTD):
        return self.final_norm(x_BTD)

    def logits(self, h_BTD):
        """The LM head over this instance's vocabulary rows: [B, T, rows] in h's dtype."""
        if self.config.tie_embeddings:
            return self.embed.attend(h_BTD)
        return self.head(h_BTD)

    def __call__(self, tokens_BT, positions_BT=None, kv_cache: KVCache | None = None, start=0,
                 rows_only: bool = False):
        """Args:
          tokens_BT: [batch, tokens] int32 token ids.
          positions_BT: absolute positions; defaults to start + arange(T).
          kv_cache: None for a cache-free forward, else the per-layer cache to write and read.
          start: cache row of the first token (a traced int32 is fine).
          rows_only: return this pass's new (k_BKTH, v_BKTH) rows per layer instead of the
            updated cache; the caller writes them with `write_kv_rows`.
        """
        if positions_BT is None:
            positions_BT = start + jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD = self.embed_tokens(tokens_BT, positions_BT)
        new_cache = []
        for i, layer in enumerate(self.layers):
            x_BTD, kv = layer(x_BTD, positions_BT, None if kv_cache is None else kv_cache[i], start,
                             rows_only)
            new_cache.append(kv)
        logits_BTV = self.logits(self.final(x_BTD))
        return logits_BTV.astype(jnp.float32), (None if kv_cache is None else tuple(new_cache))
