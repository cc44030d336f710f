"""The atomic decomposition of one decode (or prefill) step, as data (design §3).

A `Stage` is a name, its kind, the shard keys of the weights it needs, and — through its kind —
a pure function over the step's activation state. Stages hold nothing; the scheduler groups
consecutive stages and the executor jits and runs each group. A stage function applies a
method of the model's own Flax modules (`models.Block`, `models.Decoder`) to its slice of the
parameters — the monolithic `Decoder` is built from the same methods — so the two paths share
one definition of the model.

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

from stagejax import quant
from stagejax.models import ops
from stagejax.model_config import ModelConfig
from stagejax.models.decoder import Block, Decoder

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
# The math is the model's own: each function applies a method of `models.Block` or
# `models.Decoder` to the stage's slice of the parameters, and only moves arrays in and out of
# the activation state.


def _matrix(weights: dict, leaf: str, shape=None):
    """Weight `leaf` as the model's parameter: a float array (reshaped to `shape`) or the
    `QuantizedMatrix` of its stored leaves (the layer dequantizes it)."""
    if leaf in weights:
        return weights[leaf] if shape is None else weights[leaf].reshape(shape)
    return quant.QuantizedMatrix.from_stored(leaf, weights)


def _out_dim(matrix) -> int:
    """Output columns of a [in, out] parameter, float or quantized."""
    return matrix.out_dim if isinstance(matrix, quant.QuantizedMatrix) else matrix.shape[1]


def _projection(weights: dict, shape, bias_shape) -> dict:
    params = {"kernel": _matrix(weights, "w", shape)}
    if "b" in weights:
        params["bias"] = weights["b"].reshape(bias_shape)
    return params


def _norm_params(weights: dict) -> dict:
    return {"scale": weights["w"], **({"bias": weights["b"]} if "b" in weights else {})}


def _apply(module, params: dict, method, *args):
    return module.apply({"params": params}, *args, method=method)


def _norm(config, x, weights, name: str):
    """A layer's norm (`attn_norm`, `ffn_norm`) or the final one, by the model's module."""
    if name == "final_norm":
        return _apply(Decoder(config), {name: _norm_params(weights)}, Decoder.final, x)
    method = Block.attention_input if name == "attn_norm" else Block.ffn_input
    return _apply(Block(config), {name: _norm_params(weights)}, method, x)


def _project_head(config, state, weights, ctx, index, target):
    """One query head's (or kv group's) projection by the layer's own method, written into
    state[target][:, :, index]."""
    d, h = config.d_model, config.head_dim
    params = {target[0]: _projection(weights, (d, 1, h), (1, h))}
    if target == "q":
        y_BT1H = _apply(Block(config, heads=1), params, Block.queries, state["h"], ctx["positions"])
    elif target == "k_new":
        y_BT1H = _apply(Block(config, kv_heads=1), params, Block.keys, state["h"], ctx["positions"])
    else:
        y_BT1H = _apply(Block(config, kv_heads=1), params, Block.values, state["h"])
    return {**state, target: jax.lax.dynamic_update_slice(
        state[target], y_BT1H.astype(state[target].dtype), (0, 0, index, 0))}


def embed_fn(config, state, weights, ctx, index):
    """weights: the token-embedding rows [T, ...] of this step's tokens under their stored leaf
    names ("w" [T, D] float32, or e.g. "w_i4" + "w_scale", dequantized by the embedding)
    (+ "pos_rows" [T, D] for GPT-2): the model's embedding applied to the rows read."""
    t = state["x"].shape[1]
    rows = (weights["w"] if "w" in weights
            else quant.QuantizedMatrix.from_stored("w", weights, rows=True))
    params = {"embed": {"embedding": rows}}
    if "pos_rows" in weights:
        params["pos_embed"] = {"embedding": weights["pos_rows"]}
    own = jnp.arange(t, dtype=jnp.int32)[None]
    x = _apply(Decoder(config, vocab_rows=t, position_rows=t), params, Decoder.embed_tokens, own, own)
    return {**state, "x": x.astype(state["x"].dtype)}


def attn_norm_fn(config, state, weights, ctx, index):
    return {**state, "h": _norm(config, state["x"], weights, "attn_norm")}


def q_fn(config, state, weights, ctx, index):
    return _project_head(config, state, weights, ctx, index, "q")


def k_fn(config, state, weights, ctx, index):
    return _project_head(config, state, weights, ctx, index, "k_new")


def v_fn(config, state, weights, ctx, index):
    return _project_head(config, state, weights, ctx, index, "v_new")


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
    [first_head, first_head + n_heads) (`Block.attend_block`); with `finish`, also fold this
    step's own keys, write the heads' outputs into state["attn"] and return a fresh carry.

    k_SKH, v_SKH: past rows [block_start, block_start + S) of the heads' kv groups.
    kv_dtype: the cache's dtype; this step's own keys/values pass its round trip
      (`Block.cached`), so they are what a later step reads back from the cache.
    """
    block = Block(config, kv_dtype)
    n_groups = k_SKH.shape[1]
    q_TnH = jax.lax.dynamic_slice_in_dim(state["q"][0], first_head, n_heads, axis=1)
    carry = _apply(block, {}, Block.attend_block, carry, q_TnH, k_SKH, v_SKH,
                   past_mask(ctx, block_start, k_SKH.shape[0]))
    if not finish:
        return state, carry
    first_group = first_head // config.queries_per_kv_head
    own_k = jax.lax.dynamic_slice_in_dim(state["k_new"][0], first_group, n_groups, axis=1)
    own_v = jax.lax.dynamic_slice_in_dim(state["v_new"][0], first_group, n_groups, axis=1)
    own_k, own_v = _apply(block, {}, Block.cached, own_k), _apply(block, {}, Block.cached, own_v)
    carry = _apply(block, {}, Block.attend_block, carry, q_TnH, own_k, own_v, own_mask(ctx))
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
    c = config
    params = {"o": _projection(weights, (c.n_heads, c.head_dim, c.d_model), (c.d_model,))}
    y = _apply(Block(config), params, Block.attention_output, state["attn"])
    return {**state, "x": state["x"] + y}


def ffn_norm_fn(config, state, weights, ctx, index):
    return {**state, "h": _norm(config, state["x"], weights, "ffn_norm")}


def ffn_fn(config, state, weights, ctx, index):
    """One FFN chunk by the layer's own FFN over the chunk's columns, added to the residual:
    the chunks' contributions sum to the full FFN (GPT-2's down bias comes with chunk 0)."""
    up = _matrix(weights, "up")
    width = _out_dim(up)
    params = {"up": {"kernel": up}, "down": {"kernel": _matrix(weights, "down")}}
    if "gate" in weights or quant.stored_tag("gate", weights):
        params["gate"] = {"kernel": _matrix(weights, "gate")}
    if "up_b" in weights:
        params["up"]["bias"] = weights["up_b"]
    if "down_b" in weights:
        params["down"]["bias"] = weights["down_b"]
    block = Block(config, ffn_width=width, ffn_down_bias="down_b" in weights)
    return {**state, "x": state["x"] + _apply(block, params, Block.ffn, state["h"])}


def final_norm_fn(config, state, weights, ctx, index):
    return {**state, "h": _norm(config, state["x"], weights, "final_norm")}


def _head_logits(config, h_TD, weights):
    """One vocabulary chunk's logits [T, rows] by the model's head: a tied head's float32
    embedding rows [rows, D], or a [D, rows] matrix (an untied head, or a quantized tied
    head's input-major copy)."""
    if config.tie_embeddings and "w" in weights:
        rows = weights["w"].shape[0]
        params = {"embed": {"embedding": weights["w"]}}
    else:
        matrix = _matrix(weights, "w")
        rows = _out_dim(matrix)
        params = {"embed": {"embedding": matrix}} if config.tie_embeddings else {"head": {"kernel": matrix}}
    return _apply(Decoder(config, vocab_rows=rows), params, Decoder.logits, h_TD[None])[0]


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
    m_new, s_new = ops.logsumexp_update(state["nll_m"], state["nll_s"], logits_TV)
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
