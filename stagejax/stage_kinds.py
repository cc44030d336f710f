"""The stage kinds: one registry entry per kind of atomic stage (design §3).

Each `StageKind` declares everything the rest of stagejax needs to know about its stages: the
function a stage runs, how many stages of it a layer (or the model) has and the weight keys
each reads, the activation entries it reads and writes, whether it writes new KV rows or reads
the past, its FLOPs and bytes (`op_cost.Cost`), its XLA temporaries, and how it fuses into
bigger groups (`on_demand` kinds run alone; `reads_kv` kinds alone loop over KV blocks and a
layer's every head runs as one batched call). The stage builder (`stagejax.stages`), the
scheduler, planner, roofline, executor and exporter read this registry; none of them switches
on a kind's name. Adding a kind is adding its function, its cost and its entry in `KINDS`, in
execution order (docs/extending.md).

A stage function applies a method of the model's own Flax modules (`models.Block`,
`models.Decoder`) to the stage's slice of the parameters — the monolithic `Decoder` is built from
the same methods — so the staged and monolithic paths share one definition of the model. Each
takes (config, state, weights, ctx, index) and returns the new state (`stagejax.stages` lists
the state's entries); `weights` maps the stage's weight-key leaf names ("w", "b", "gate", ...)
to arrays; `index` is a traced int32 (the head, kv group, or first row of the stage's chunk).
Family differences come from `config.traits` (`stagejax.models.family`), never a family's name.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stagejax import quant
from stagejax.model_config import ModelConfig
from stagejax.models import ops
from stagejax.models.decoder import Block, Decoder
from stagejax.op_cost import (GELU_TANH_FLOPS, LAYERNORM_FLOPS, LOGSUMEXP_FLOPS, RMSNORM_FLOPS,
                              ROPE_FLOPS, SOFTMAX_FLOPS_PER_SCORE, SWIGLU_ACT_FLOPS, Bits, Cost)

# ---- the stage functions ---------------------------------------------------------------------
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
        return _apply(Decoder(config, with_layers=False), {name: _norm_params(weights)}, Decoder.final, x)
    method = Block.attention_input if name == "attn_norm" else Block.ffn_input
    return _apply(Block(config), {name: _norm_params(weights)}, method, x)


def _project_head(config, state, weights, ctx, index, target):
    """One query head's (or kv group's) projection by the layer's own method, written into
    state[target][:, :, index]."""
    d, h = config.d_model, config.head_dim
    params = {target[0]: _projection(weights, (d, 1, h), (1, h))}
    if "norm" in weights:  # QK-norm: the head's scale (every head's copy of the layer's)
        params[f"{target[0]}_norm"] = {"scale": weights["norm"]}
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
    (+ "pos_rows" [T, D] with learned positions): the model's embedding applied to the rows read."""
    t = state["x"].shape[1]
    rows = (weights["w"] if "w" in weights
            else quant.QuantizedMatrix.from_stored("w", weights, rows=True))
    params = {"embed": {"embedding": rows}}
    if "pos_rows" in weights:
        params["pos_embed"] = {"embedding": weights["pos_rows"]}
    own = jnp.arange(t, dtype=jnp.int32)[None]
    x = _apply(Decoder(config, vocab_rows=t, position_rows=t, with_layers=False), params,
               Decoder.embed_tokens, own, own)
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
    the chunks' contributions sum to the full FFN (a down bias comes with chunk 0)."""
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
    return _apply(Decoder(config, vocab_rows=rows, with_layers=False), params, Decoder.logits,
                  h_TD[None])[0]


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


# ---- costs ---------------------------------------------------------------------------------------
# Each returns the op's `Cost` and the activation entries it reads {entry: bytes} (separately, so
# a fused group counts each entry once). Conventions: `stagejax.roofline`'s docstring.


@dataclasses.dataclass(frozen=True)
class OpShape:
    """The extent of one op: a pass of `tokens` tokens after `kv_len` cached rows, over `units`
    query heads (q, attn) or kv groups (k, v) reading `kv_groups` kv groups (attn), or `width`
    FFN columns or vocabulary rows (ffn, head). `first_chunk`: the FFN chunk that carries the
    down bias; `scoring`: the head scores every token (perplexity), not the last one;
    `elementwise`: count elementwise FLOPs too (False: matrix and attention FLOPs only)."""

    tokens: int
    kv_len: int = 0
    units: int = 1
    kv_groups: int = 1
    width: int = 0
    first_chunk: bool = True
    scoring: bool = False
    elementwise: bool = True


def _embed_cost(config: ModelConfig, bits: Bits, op: OpShape):
    t, d = op.tokens, config.d_model
    params = t * config.traits.embed_rows_per_token * d  # a token's row (and its position's)
    adds = t * d if config.traits.learned_positions else 0
    return Cost(flops=op.elementwise * adds, weight_bytes=params * bits.weight / 8,
                act_write_bytes=t * d * bits.act / 8, weight_params=params), {}


def _norm_cost(config: ModelConfig, bits: Bits, op: OpShape):
    t, d, ab = op.tokens, config.d_model, bits.act / 8
    params = d * (2 if config.traits.biases else 1)
    per_element = LAYERNORM_FLOPS if config.traits.norm == "layer" else RMSNORM_FLOPS
    return Cost(flops=op.elementwise * per_element * t * d, weight_bytes=params * bits.vector / 8,
                act_write_bytes=t * d * ab, weight_params=params), {"x": t * d * ab}


def _head_projection_cost(rotated: bool, to_cache: bool):
    """q (rotated), k (rotated, new cache rows) or v (new cache rows) over `units` heads."""
    def cost(config: ModelConfig, bits: Bits, op: OpShape):
        t, d, h, ab = op.tokens, config.d_model, config.head_dim, bits.act / 8
        matrix = op.units * d * h
        bias = op.units * h if config.traits.biases else 0
        norm = op.units * h if rotated and config.traits.qk_norm else 0  # a scale per head
        flops = 2 * t * matrix + op.elementwise * t * (bias + RMSNORM_FLOPS * norm)
        if rotated and config.traits.rope:
            flops += op.elementwise * ROPE_FLOPS * t * op.units * h
        kv_write = t * op.units * h * bits.kv / 8 if to_cache else 0.0
        vectors = bias + norm
        return Cost(flops=flops, weight_bytes=matrix * bits.weight / 8 + vectors * bits.vector / 8,
                    kv_write_bytes=kv_write, act_write_bytes=t * op.units * h * ab,
                    weight_params=matrix + vectors), {"h": t * d * ab}
    return cost


def _attention_cost(config: ModelConfig, bits: Bits, op: OpShape):
    t, s, h, ab = op.tokens, op.kv_len, config.head_dim, bits.act / 8
    attended = t * s + t * (t + 1) / 2  # keys per head: the past, plus this pass causally
    flops = op.units * attended * (4 * h + op.elementwise * SOFTMAX_FLOPS_PER_SCORE)
    reads = {"q": t * op.units * h * ab, "k_new": t * op.kv_groups * h * ab,
             "v_new": t * op.kv_groups * h * ab}
    return Cost(flops=flops, kv_bytes=2 * s * op.kv_groups * h * bits.kv / 8,
                act_write_bytes=t * op.units * h * ab), reads


def _output_projection_cost(config: ModelConfig, bits: Bits, op: OpShape):
    t, d, ab = op.tokens, config.d_model, bits.act / 8
    n_h = config.n_heads * config.head_dim
    matrix, bias = n_h * d, (d if config.traits.biases else 0)
    flops = 2 * t * matrix + op.elementwise * t * (d + bias)  # + residual add (+ bias)
    return Cost(flops=flops, weight_bytes=matrix * bits.weight / 8 + bias * bits.vector / 8,
                act_write_bytes=t * d * ab, weight_params=matrix + bias), {"attn": t * n_h * ab,
                                                                           "x": t * d * ab}


def _ffn_cost(config: ModelConfig, bits: Bits, op: OpShape):
    t, d, f, ab = op.tokens, config.d_model, op.width, bits.act / 8
    biases = config.traits.biases
    if config.traits.gated_ffn:  # gate, up, silu(gate) * up, down
        matrix = 3 * d * f
        activation = SWIGLU_ACT_FLOPS * f
    else:  # up, GELU, down
        matrix = 2 * d * f
        activation = GELU_TANH_FLOPS * f
    down_bias = d if biases and op.first_chunk else 0
    bias = (f if biases else 0) + down_bias
    flops = 2 * t * matrix + op.elementwise * t * (activation + d + bias)  # + residual (+ biases)
    return Cost(flops=flops, weight_bytes=matrix * bits.weight / 8 + bias * bits.vector / 8,
                act_write_bytes=t * d * ab, weight_params=matrix + bias), {"h": t * d * ab,
                                                                           "x": t * d * ab}


def _head_cost(config: ModelConfig, bits: Bits, op: OpShape):
    t, d, ab = op.tokens, config.d_model, bits.act / 8
    rows = t if op.scoring else 1  # generation: the last real token's logits only
    matrix = op.width * d
    flops = 2 * rows * matrix + op.elementwise * (LOGSUMEXP_FLOPS * rows * op.width if op.scoring else 0)
    written = 3 * t * 4 if op.scoring else op.width * ab  # (m, s, target) float32 per token, or logits
    return Cost(flops=flops, weight_bytes=matrix * bits.weight / 8, act_write_bytes=written,
                weight_params=matrix), {"h": rows * d * ab}


# ---- XLA temporaries beyond each stage's output (`scheduler.xla_scratch_bytes`) -------------------


def _ffn_scratch(config: ModelConfig, tokens: int, widths, scoring: bool) -> int:
    """Inner activations of a group's FFN chunks: at most gate and up over the FFN's whole width."""
    return 2 * tokens * config.ffn_dim


def _head_scratch(config: ModelConfig, tokens: int, widths, scoring: bool) -> int:
    """A scoring pass's head chunks materialise their logits [T, rows] to fold into the running
    log-sum-exp, every chunk's at once at worst, and one more for the exponentials."""
    return tokens * (sum(widths) + max(widths, default=0)) if scoring else 0


# ---- weight keys (`stagejax.store.layout` stores each stage's arrays under these) -------------------


def _prefix(layer: int | None) -> str:
    return "" if layer is None else f"L{layer}/"


def _vector_leaves(config: ModelConfig) -> tuple[str, ...]:
    return ("w", "b") if config.traits.biases else ("w",)


def _embed_keys(config, layout, layer, index) -> tuple[str, ...]:
    rows = tuple(f"embed/{c}/w" for c in range(layout.n_vocab_chunks))
    return rows + (("pos_embed/w",) if config.traits.learned_positions else ())


def _named_keys(name: str, indexed: bool = False):
    """Keys of a norm (`L{i}/attn_norm/w` (+ `/b`)), a projection or one head of one
    (`L{i}/q/{h}/w` (+ `/b`))."""
    def keys(config, layout, layer, index) -> tuple[str, ...]:
        group = f"{_prefix(layer)}{name}" + (f"/{index}" if indexed else "")
        return tuple(f"{group}/{leaf}" for leaf in _vector_leaves(config))
    return keys


def _head_keys_with_norm(name: str):
    """Keys of one query head or kv group (`L{i}/q/{h}/w` (+ `/b`)), with its QK-norm scale
    (`L{i}/q/{h}/norm`) in families that norm queries and keys per head."""
    projection = _named_keys(name, indexed=True)

    def keys(config, layout, layer, index) -> tuple[str, ...]:
        own = projection(config, layout, layer, index)
        if config.traits.qk_norm:
            own += (f"{_prefix(layer)}{name}/{index}/norm",)
        return own
    return keys


def _ffn_keys(config, layout, layer, index) -> tuple[str, ...]:
    if config.traits.gated_ffn:
        leaves = ("gate", "up", "down")
    else:  # the down bias once per layer, with chunk 0
        leaves = ("up", "up_b", "down") + (("down_b",) if index == 0 else ())
    return tuple(f"{_prefix(layer)}ffn/{index}/{leaf}" for leaf in leaves)


def _head_keys(config, layout, layer, index) -> tuple[str, ...]:
    return (f"{'embed' if config.tie_embeddings else 'head'}/{index}/w",)


# ---- the registry ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StageKind:
    """One kind of atomic stage.

    scope: "first" (once, before the layers), "layer" (in every layer) or "last" (once, after).
    fn: the stage function (see the module docstring).
    reads, writes: activation entries of a generation pass; `scoring_state`: the entries it
      updates in a scoring pass instead of writing `writes` (the head's NLL accumulators).
    cost: (config, `Bits`, `OpShape`) -> (`Cost`, {entry: bytes read}).
    count: (config, layout) -> stages of this kind per scope (heads, kv groups, chunks).
    weight_keys: (config, layout, layer, index) -> the float32 keys of a stage's weights.
    units: "heads" or "kv_heads" when its stages are one query head or kv group each.
    chunks: "ffn" or "vocab" when its stages are chunks of the FFN width or the vocabulary (its
      traced index is then the chunk's first row for "vocab").
    writes_kv: its outputs are new cache rows, written to the cache after the group holding
      the layer's last such stage.
    reads_kv: reads its layer's past keys and values. A group of only such stages of one layer
      loops over KV blocks (one head, or whole kv groups of heads); fused with other stages it
      reads the layer's whole past, and a run of a layer's every head is one call of `layer_fn`.
    on_demand: its weights are rows picked by the pass's tokens, read when it runs and never
      prefetched; it is always a group of its own.
    shared_input: stages of one group with the same label read one value of their entries
      (q, k and v read the same normed h): the roofline counts it once.
    scratch: (config, tokens, widths of the group's stages of this kind, scoring) -> float32
      elements of XLA temporaries beyond the stages' outputs (None: outputs only).
    op: its name in whole-model breakdowns (the norms share "norm").
    """

    name: str
    scope: str
    fn: Callable
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    cost: Callable
    count: Callable = lambda config, layout: 1
    weight_keys: Callable = lambda config, layout, layer, index: ()
    units: str | None = None
    chunks: str | None = None
    scoring_state: tuple[str, ...] = ()
    writes_kv: bool = False
    reads_kv: bool = False
    on_demand: bool = False
    shared_input: str | None = None
    layer_fn: Callable | None = None
    scratch: Callable | None = None
    op: str = ""

    def __post_init__(self):
        if self.scope not in ("first", "layer", "last"):
            raise ValueError(f"stage kind {self.name!r}: scope must be first, layer or last")
        if not self.op:
            object.__setattr__(self, "op", self.name)

    @property
    def indexed(self) -> bool:
        """Whether its stage ids carry an index (`L0.q.3`, `head.0`)."""
        return self.units is not None or self.chunks is not None

    def reads_in(self, scoring: bool) -> tuple[str, ...]:
        return self.reads + (self.scoring_state if scoring else ())

    def writes_in(self, scoring: bool) -> tuple[str, ...]:
        return self.scoring_state if scoring and self.scoring_state else self.writes


_heads = lambda config, layout: config.n_heads  # noqa: E731
_kv_heads = lambda config, layout: config.n_kv_heads  # noqa: E731

# In execution order within each scope.
KINDS: dict[str, StageKind] = {kind.name: kind for kind in (
    StageKind("embed", "first", embed_fn, (), ("x",), _embed_cost, weight_keys=_embed_keys,
              on_demand=True),
    StageKind("attn_norm", "layer", attn_norm_fn, ("x",), ("h",), _norm_cost,
              weight_keys=_named_keys("attn_norm"), op="norm"),
    StageKind("q", "layer", q_fn, ("h",), ("q",), _head_projection_cost(True, False),
              count=_heads, weight_keys=_head_keys_with_norm("q"), units="heads",
              shared_input="qkv"),
    StageKind("k", "layer", k_fn, ("h",), ("k_new",), _head_projection_cost(True, True),
              count=_kv_heads, weight_keys=_head_keys_with_norm("k"), units="kv_heads",
              writes_kv=True, shared_input="qkv"),
    StageKind("v", "layer", v_fn, ("h",), ("v_new",), _head_projection_cost(False, True),
              count=_kv_heads, weight_keys=_named_keys("v", indexed=True), units="kv_heads",
              writes_kv=True, shared_input="qkv"),
    StageKind("attn", "layer", attn_fn, ("q", "k_new", "v_new", "attn"), ("attn",),
              _attention_cost, count=_heads, units="heads", reads_kv=True, layer_fn=attn_layer_fn),
    StageKind("o", "layer", o_fn, ("attn", "x"), ("x",), _output_projection_cost,
              weight_keys=_named_keys("o")),
    StageKind("ffn_norm", "layer", ffn_norm_fn, ("x",), ("h",), _norm_cost,
              weight_keys=_named_keys("ffn_norm"), op="norm"),
    StageKind("ffn", "layer", ffn_fn, ("h", "x"), ("x",), _ffn_cost,
              count=lambda config, layout: layout.n_ffn_chunks, weight_keys=_ffn_keys,
              chunks="ffn", scratch=_ffn_scratch),
    StageKind("final_norm", "last", final_norm_fn, ("x",), ("h",), _norm_cost,
              weight_keys=_named_keys("final_norm"), op="norm"),
    StageKind("head", "last", head_fn, ("h",), ("logits",), _head_cost,
              count=lambda config, layout: layout.n_vocab_chunks, weight_keys=_head_keys,
              chunks="vocab", scoring_state=("nll_m", "nll_s", "nll_target"), scratch=_head_scratch),
)}


class StageCalls:
    """The stages of one decoder's groups as called inside their traced group functions: each
    a nested `jax.jit`, so that each distinct signature (kind, entries' shapes) is traced and
    lowered once per decoder instead of once per stage — a group of a layer's 9 query heads or
    96 vocabulary chunks repeats one signature, and applying the model's Flax method costs ~2 ms
    a trace. XLA inlines the calls: the compiled group is the same. One per decoder (not per
    process) so that a decoder built after the model's methods change traces them anew.
    Entries of `weights` that are not arrays (the KV cache's dtype) are static. With
    `nested=False` the stages are called directly: a group of one stage (and `atomic`'s groups
    of the same signature share one executable) gains nothing from the nesting and pays its
    extra trace (~2 ms a group)."""

    def __init__(self, config: ModelConfig, nested: bool = True):
        self.config, self.nested = config, nested
        self._jitted: dict[tuple, Callable] = {}

    def __call__(self, kind: str, state: dict, weights: dict, ctx: dict, index,
                 whole_layer: bool = False) -> dict:
        """Stage `kind` (its `layer_fn` for a layer's every head with `whole_layer`)."""
        if not self.nested:
            fn = KINDS[kind].layer_fn if whole_layer else KINDS[kind].fn
            return fn(self.config, state, weights, ctx, index)
        arrays = {name: value for name, value in weights.items() if _is_array(value)}
        statics = tuple(sorted(((name, value) for name, value in weights.items()
                                if name not in arrays), key=lambda item: item[0]))
        key = (kind, whole_layer, statics)
        if key not in self._jitted:
            self._jitted[key] = self._jit(kind, whole_layer, statics)
        return self._jitted[key](state, arrays, ctx, index)

    def _jit(self, kind: str, whole_layer: bool, statics: tuple) -> Callable:
        fn, config = KINDS[kind].layer_fn if whole_layer else KINDS[kind].fn, self.config

        def stage(state, arrays, ctx, index):
            return fn(config, state, {**arrays, **dict(statics)}, ctx, index)

        stage.__name__ = f"{kind}_layer" if whole_layer else kind
        return jax.jit(stage)


def _is_array(value) -> bool:
    return isinstance(value, (jax.Array, np.ndarray))
