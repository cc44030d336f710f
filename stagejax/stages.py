"""The atomic decomposition of one decode (or prefill) step, as data (design §3).

A `Stage` is a name, its kind, the shard keys of the weights it needs, and — through its kind
(`stagejax.stage_kinds.KINDS`) — a pure function over the step's activation state. Stages hold
nothing; the scheduler groups consecutive stages and the executor jits and runs each group.

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

import jax.numpy as jnp

from stagejax import quant
from stagejax.model_config import ModelConfig
from stagejax.models import ops
from stagejax.stage_kinds import KINDS


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
        return KINDS[self.kind].writes_kv


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
    config.require_dense("The staged path")
    stages = _float_stages(config, layout)
    if stored is None:
        return stages
    head_copy = config.tie_embeddings and quant.stored_tag("head/0/w", stored) is not None

    def keys(stage: Stage) -> tuple[str, ...]:
        float_keys = stage.weight_keys
        if KINDS[stage.kind].chunks == "vocab" and head_copy:  # a tied head's input-major copy
            float_keys = (f"head/{stage.index}/w",)
        return tuple(k for key in float_keys for k in quant.stored_keys(key, stored))

    return [dataclasses.replace(s, weight_keys=keys(s)) for s in stages]


def _float_stages(config: ModelConfig, layout: ChunkLayout) -> list[Stage]:
    """Every kind's stages (`KINDS`, in execution order): the first scope's, each layer's, the last's."""
    def of(scope: str, layer: int | None) -> list[Stage]:
        out = []
        for kind in KINDS.values():
            if kind.scope != scope:
                continue
            prefix = f"L{layer}." if layer is not None else ""
            for j in range(kind.count(config, layout)):
                out.append(Stage(f"{prefix}{kind.name}" + (f".{j}" if kind.indexed else ""),
                                 kind.name, layer, j, kind.weight_keys(config, layout, layer, j)))
        return out

    stages = of("first", None)
    for i in range(config.n_layers):
        stages += of("layer", i)
    return stages + of("last", None)


def stage_index_value(stage: Stage, layout: ChunkLayout) -> int:
    """The traced per-stage constant: head/group index, or the first row of a vocabulary chunk."""
    return layout.vocab_bounds[stage.index] if KINDS[stage.kind].chunks == "vocab" else stage.index


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
