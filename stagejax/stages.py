"""The atomic decomposition of one decode (or prefill) step, as data (design §3).

A `Stage` is a name, its kind, the shard keys of the weights it needs, and — through its kind —
a pure function over the step's activation state. Stages hold nothing; the scheduler groups
consecutive stages and the executor jits and runs each group. Every stage function calls the
same `stagejax.ops` math as the monolithic `Decoder`, so the two paths cannot drift apart.

Activation state (one dict of arrays, donated from group to group; batch 1, T tokens):
  x [1, T, D] residual stream      h [1, T, D] normed hidden
  q [1, T, N, H] queries (RoPE)    k_new, v_new [1, T, K, H] this step's keys (RoPE) and values
  attn [1, T, N, H] head outputs   logits [V] of the last real token (generation mode)
  nll_m, nll_s, nll_target [T]     running log-sum-exp and target logit (scoring mode)

Step context (not donated): positions [1, T] int32 absolute positions; past_len int32 (cache
rows written before this step); last int32 (row of the last real token); targets [T] int32
(scoring mode). Per-group constants: `index` [n_stages] int32 (each stage's head, kv group or
vocabulary offset), so same-shaped groups in different layers or heads share one executable.

Attention reads the KV of earlier steps ("past", rows [0, past_len)) from the host cache and
this step's own keys and values from the state, combined by exact online softmax.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from stagejax import ops, quant
from stagejax.model_config import ModelConfig

KINDS = ("embed", "attn_norm", "q", "k", "v", "attn", "o", "ffn_norm", "ffn", "final_norm", "head")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One atomic stage. `index` is the head (q, attn), kv group (k, v) or chunk (ffn, head)."""

    id: str
    kind: str
    layer: int | None = None
    index: int = 0
    weight_keys: tuple[str, ...] = ()

    @property
    def writes_kv(self) -> bool:
        return self.kind in ("k", "v")


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """How the FFN width and the vocabulary are cut into stages (a conversion parameter)."""

    ffn_bounds: tuple[int, ...]  # chunk c covers columns [ffn_bounds[c], ffn_bounds[c + 1])
    vocab_bounds: tuple[int, ...]  # vocab chunk c covers rows [vocab_bounds[c], vocab_bounds[c + 1])

    @classmethod
    def create(cls, config: ModelConfig, ffn_chunks: int = 1, vocab_chunk: int | None = None):
        return cls(split_bounds(config.ffn_dim, ffn_chunks),
                   chunk_bounds(config.vocab_size, vocab_chunk or config.vocab_size))

    @property
    def n_ffn_chunks(self) -> int:
        return len(self.ffn_bounds) - 1

    @property
    def n_vocab_chunks(self) -> int:
        return len(self.vocab_bounds) - 1

    def vocab_chunk_of(self, token: int) -> int:
        for c in range(self.n_vocab_chunks):
            if token < self.vocab_bounds[c + 1]:
                return c
        raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab_bounds[-1]}")


def split_bounds(total: int, n_chunks: int) -> tuple[int, ...]:
    """`n_chunks` near-equal parts of `total` (numpy.array_split's rule: larger parts first)."""
    if not 1 <= n_chunks <= total:
        raise ValueError(f"cannot cut {total} into {n_chunks} chunks")
    base, extra = divmod(total, n_chunks)
    bounds = [0]
    for c in range(n_chunks):
        bounds.append(bounds[-1] + base + (1 if c < extra else 0))
    return tuple(bounds)


def chunk_bounds(total: int, chunk: int) -> tuple[int, ...]:
    """Chunks of `chunk` rows (the last one shorter)."""
    if chunk <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk}")
    return tuple(list(range(0, total, chunk)) + [total])


def build_stages(config: ModelConfig, layout: ChunkLayout, stored=None) -> list[Stage]:
    """The atomic stages of one step, in execution order (design §3).

    `stored`: the checkpoint's array keys (e.g. `manifest.arrays`). A quantized weight is
    stored as several arrays (`L0/q/3/w_i4` + `L0/q/3/w_scale`, see `stagejax.quant`); with
    `stored`, each stage lists the arrays it reads. Without it, the float32 keys.
    """
    stages = _float_stages(config, layout)
    if stored is None:
        return stages
    head_copy = config.tie_embeddings and quant.stored_tag("head/0/w", stored) is not None

    def keys(stage: Stage) -> tuple[str, ...]:
        float_keys = stage.weight_keys
        if stage.kind == "head" and head_copy:  # a tied head's input-major copy
            float_keys = (f"head/{stage.index}/w",)
        return tuple(k for key in float_keys for k in quant.stored_keys(key, stored))

    return [dataclasses.replace(s, weight_keys=keys(s)) for s in stages]


def _float_stages(config: ModelConfig, layout: ChunkLayout) -> list[Stage]:
    gpt2 = config.family == "gpt2"
    bias = ("b",) if gpt2 else ()
    stages = [Stage("embed", "embed", weight_keys=tuple(
        [f"embed/{c}/w" for c in range(layout.n_vocab_chunks)] + (["pos_embed/w"] if gpt2 else [])))]
    for i in range(config.n_layers):
        p = f"L{i}"
        stages.append(Stage(f"{p}.attn_norm", "attn_norm", i, 0,
                            tuple(f"{p}/attn_norm/{leaf}" for leaf in ("w",) + bias)))
        for kind, count in (("q", config.n_heads), ("k", config.n_kv_heads), ("v", config.n_kv_heads)):
            stages += [Stage(f"{p}.{kind}.{j}", kind, i, j,
                             tuple(f"{p}/{kind}/{j}/{leaf}" for leaf in ("w",) + bias))
                       for j in range(count)]
        stages += [Stage(f"{p}.attn.{h}", "attn", i, h) for h in range(config.n_heads)]
        stages.append(Stage(f"{p}.o", "o", i, 0, tuple(f"{p}/o/{leaf}" for leaf in ("w",) + bias)))
        stages.append(Stage(f"{p}.ffn_norm", "ffn_norm", i, 0,
                            tuple(f"{p}/ffn_norm/{leaf}" for leaf in ("w",) + bias)))
        for c in range(layout.n_ffn_chunks):
            leaves = ("up", "up_b", "down") + (("down_b",) if c == 0 else ()) if gpt2 else ("gate", "up", "down")
            stages.append(Stage(f"{p}.ffn.{c}", "ffn", i, c, tuple(f"{p}/ffn/{c}/{leaf}" for leaf in leaves)))
    stages.append(Stage("final_norm", "final_norm", None, 0,
                        tuple(f"final_norm/{leaf}" for leaf in ("w",) + bias)))
    head = "embed/{c}/w" if config.tie_embeddings else "head/{c}/w"
    stages += [Stage(f"head.{c}", "head", None, c, (head.format(c=c),))
               for c in range(layout.n_vocab_chunks)]
    return stages


def stage_index_value(stage: Stage, layout: ChunkLayout) -> int:
    """The traced per-stage constant: head/group index, or the vocabulary offset of a head chunk."""
    return layout.vocab_bounds[stage.index] if stage.kind == "head" else stage.index


# ---- the stage functions ---------------------------------------------------------------------
# Each takes (config, state, weights, ctx, index) and returns the new state. `weights` maps the
# stage's weight-key leaf names ("w", "b", "gate", ...) to arrays; `index` is a traced int32.


def _norm(config, x, weights):
    if config.family == "gpt2":
        return ops.layer_norm(x, weights["w"], weights["b"], config.norm_eps)
    return ops.rms_norm(x, weights["w"], config.norm_eps)


def _project_head(config, state, weights, ctx, index, target, rope: bool):
    """One head's (or kv group's) projection, written into state[target][:, :, index]."""
    y = jnp.einsum("BTD,DH->BTH", state["h"], quant.matrix(weights, "w", after=state["h"]))
    if "b" in weights:
        y = y + weights["b"]
    y_BT1H = y[:, :, None, :]
    if rope and config.family == "llama":
        y_BT1H = ops.rope(y_BT1H, ctx["positions"], config.rope_theta)
    return {**state, target: jax.lax.dynamic_update_slice(
        state[target], y_BT1H.astype(state[target].dtype), (0, 0, index, 0))}


def embed_fn(config, state, weights, ctx, index):
    """weights: the token-embedding rows [T, ...] of this step's tokens under their stored leaf
    names ("w" [T, D] float32, or e.g. "w_i4" + "w_scale", dequantized here) (+ "pos_rows"
    [T, D] for GPT-2)."""
    x = quant.embedding_rows(weights, "w")[None]
    if "pos_rows" in weights:
        x = x + weights["pos_rows"][None]
    return {**state, "x": x.astype(state["x"].dtype)}


def attn_norm_fn(config, state, weights, ctx, index):
    return {**state, "h": _norm(config, state["x"], weights)}


def q_fn(config, state, weights, ctx, index):
    return _project_head(config, state, weights, ctx, index, "q", rope=True)


def k_fn(config, state, weights, ctx, index):
    return _project_head(config, state, weights, ctx, index, "k_new", rope=True)


def v_fn(config, state, weights, ctx, index):
    return _project_head(config, state, weights, ctx, index, "v_new", rope=False)


def past_mask(ctx, block_start, block_len: int):
    """[T, S] mask of a block of past cache rows starting at `block_start`: rows already
    written (< past_len) that are not after the query (causal)."""
    key_positions = block_start + jnp.arange(block_len)
    causal = key_positions[None, :] <= ctx["positions"][0][:, None]
    return causal & (key_positions < ctx["past_len"])[None, :]


def own_mask(ctx):
    """[T, T] causal mask among this step's own tokens."""
    positions = ctx["positions"][0]
    return positions[None, :] <= positions[:, None]


def kv_groups_of(config: ModelConfig, n_heads: int) -> int:
    """How many kv groups a run of `n_heads` consecutive query heads reads: a single head
    (atomic) reads its own group; a larger run must cover whole groups."""
    g = config.queries_per_kv_head
    if n_heads == 1:
        return 1
    if n_heads % g:
        raise ValueError(f"an attention group of {n_heads} heads must cover whole kv groups of {g}")
    return n_heads // g


def attention_block_step(config, state, carry, ctx, first_head, n_heads: int, k_SKH, v_SKH,
                         block_start, finish: bool, kv_dtype: str = "float32"):
    """Fold one block of past keys/values into the online-softmax carry of heads
    [first_head, first_head + n_heads); with `finish`, also fold this step's own keys, write
    the heads' outputs into state["attn"] and return a fresh carry.

    k_SKH, v_SKH: past rows [block_start, block_start + S) of the heads' kv groups.
    kv_dtype: the cache's dtype; this step's own keys/values pass its round trip, so they are
      what a later step reads back from the cache.
    """
    n_groups = k_SKH.shape[1]
    q_TnH = jax.lax.dynamic_slice_in_dim(state["q"][0], first_head, n_heads, axis=1)
    carry = ops.online_softmax_update(carry, q_TnH, k_SKH, v_SKH,
                                      past_mask(ctx, block_start, k_SKH.shape[0]))
    if not finish:
        return state, carry
    first_group = first_head // config.queries_per_kv_head
    own_k = jax.lax.dynamic_slice_in_dim(state["k_new"][0], first_group, n_groups, axis=1)
    own_v = jax.lax.dynamic_slice_in_dim(state["v_new"][0], first_group, n_groups, axis=1)
    own_k, own_v = ops.kv_roundtrip(own_k, kv_dtype), ops.kv_roundtrip(own_v, kv_dtype)
    carry = ops.online_softmax_update(carry, q_TnH, own_k, own_v, own_mask(ctx))
    out_1TnH = ops.online_softmax_finish(carry)[None].astype(state["attn"].dtype)
    attn = jax.lax.dynamic_update_slice(state["attn"], out_1TnH, (0, 0, first_head, 0))
    t, _, h = q_TnH.shape
    return {**state, "attn": attn}, ops.online_softmax_init(t, n_heads, h)


def attn_fn(config, state, weights, ctx, index):
    """One head over the whole past of its kv group (weights: "past_k", "past_v" [S, 1, H],
    `kv_cache.stored_kv_group`, and the cache's "kv_dtype"), for attention fused into a larger
    group."""
    t, h = state["q"].shape[1], state["q"].shape[3]
    state, _ = attention_block_step(config, state, ops.online_softmax_init(t, 1, h), ctx, index, 1,
                                    weights["past_k"], weights["past_v"], 0, True,
                                    weights.get("kv_dtype", "float32"))
    return state


def attn_layer_fn(config, state, weights, ctx, index):
    """Every head of a layer over the whole past (weights: "past_k", "past_v" [S, K, H] and
    the cache's "kv_dtype") as one batched attention, as the `op` policy's attention group and
    the monolithic model compute it: for a fused group holding a layer's whole attention. Per
    head (`attn_fn`) XLA ran nine small attentions at ~3x the cost (SmolLM2, ~1 ms a layer)."""
    t, h = state["q"].shape[1], state["q"].shape[3]
    n = config.n_heads
    state, _ = attention_block_step(config, state, ops.online_softmax_init(t, n, h), ctx, 0, n,
                                    weights["past_k"], weights["past_v"], 0, True,
                                    weights.get("kv_dtype", "float32"))
    return state


def o_fn(config, state, weights, ctx, index):
    y = ops.output_projection(state["attn"], quant.matrix(weights, "w", after=state["attn"]))
    if "b" in weights:
        y = y + weights["b"]
    return {**state, "x": state["x"] + y}


def ffn_norm_fn(config, state, weights, ctx, index):
    return {**state, "h": _norm(config, state["x"], weights)}


def ffn_fn(config, state, weights, ctx, index):
    """One FFN chunk, added to the residual: the chunks' contributions sum to the full FFN."""
    h = state["h"]
    up, down = quant.matrix(weights, "up", after=h), quant.matrix(weights, "down", after=h)
    if config.family == "llama":
        y = ops.swiglu(h, quant.matrix(weights, "gate", after=h), up, down)
    else:
        y = ops.gelu_mlp(h, up, weights["up_b"], down)
        if "down_b" in weights:
            y = y + weights["down_b"]
    return {**state, "x": state["x"] + y}


def final_norm_fn(config, state, weights, ctx, index):
    return {**state, "h": _norm(config, state["x"], weights)}


def _head_logits(config, h_TD, weights):
    if config.tie_embeddings and "w" in weights:  # float32 embedding rows [rows, D]
        return jnp.einsum("TD,VD->TV", h_TD, weights["w"])
    return jnp.einsum("TD,DV->TV", h_TD, quant.matrix(weights, "w", after=h_TD))  # [D, rows]


def head_fn(config, state, weights, ctx, index):
    """One vocabulary chunk of the LM head (`index` = its first token id).

    Generation mode writes the last real token's logits into state["logits"]; scoring mode
    folds every token's chunk into a running log-sum-exp and picks the target's logit, so
    log-probabilities are exact across chunks without materialising [T, V].
    """
    if "logits" in state:
        h_1D = jax.lax.dynamic_slice_in_dim(state["h"][0], ctx["last"], 1, axis=0)
        logits = _head_logits(config, h_1D, weights)[0].astype(jnp.float32)
        return {**state, "logits": jax.lax.dynamic_update_slice(state["logits"], logits, (index,))}
    logits_TV = _head_logits(config, state["h"][0], weights).astype(jnp.float32)
    chunk_max = jnp.max(logits_TV, axis=-1)
    m_new = jnp.maximum(state["nll_m"], chunk_max)
    s_new = (state["nll_s"] * jnp.exp(state["nll_m"] - m_new)
             + jnp.sum(jnp.exp(logits_TV - m_new[:, None]), axis=-1))
    local = ctx["targets"] - index
    inside = (local >= 0) & (local < logits_TV.shape[1])
    picked = jnp.take_along_axis(logits_TV, jnp.clip(local, 0, logits_TV.shape[1] - 1)[:, None], 1)[:, 0]
    return {**state, "nll_m": m_new, "nll_s": s_new,
            "nll_target": jnp.where(inside, picked, state["nll_target"])}


STAGE_FNS = {
    "embed": embed_fn, "attn_norm": attn_norm_fn, "q": q_fn, "k": k_fn, "v": v_fn,
    "attn": attn_fn, "o": o_fn, "ffn_norm": ffn_norm_fn, "ffn": ffn_fn,
    "final_norm": final_norm_fn, "head": head_fn,
}


def init_state(config: ModelConfig, tokens: int, scoring: bool = False) -> dict:
    """Zeroed activation state for `tokens` tokens (generation or scoring mode)."""
    t, d, n, k, h = tokens, config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    state = {"x": jnp.zeros((1, t, d)), "h": jnp.zeros((1, t, d)), "q": jnp.zeros((1, t, n, h)),
             "k_new": jnp.zeros((1, t, k, h)), "v_new": jnp.zeros((1, t, k, h)),
             "attn": jnp.zeros((1, t, n, h))}
    if scoring:
        state.update(nll_m=jnp.full((t,), ops.MASK_VALUE), nll_s=jnp.zeros((t,)),
                     nll_target=jnp.zeros((t,)))
    else:
        state["logits"] = jnp.zeros((config.vocab_size,))
    return state


def scored_nll(state):
    """Per-token negative log-likelihood of the targets, from a scoring-mode state: [T]."""
    return state["nll_m"] + jnp.log(state["nll_s"]) - state["nll_target"]
