"""Grouping atomic stages into jitted units, and the plan's memory accounting (design §5).

Fixed policies:
  atomic — every stage alone (attention: one head, looping over KV blocks);
  op     — all heads / groups / chunks of one op together (attention: all heads of a layer,
           looping over KV blocks);
  layer  — every stage of a layer in one unit (attention over the layer's whole past);
  model  — the classic baseline: weights resident, one jit per step (run by `MonolithicDecoder`;
           its plan is one group).
`embed` is always its own unit: its weights are the rows of this step's tokens, read on demand.

Budget accounting (what a group holds while it runs): its weights + the activations it reads
and writes + the KV it reads (one block, or its layer's whole past when attention is fused with
other stages) + the weights of the next `prefetch_depth` units being read ahead.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from stagejax.models import ops
from stagejax.model_config import ModelConfig
from stagejax.stages import ChunkLayout, Stage, kv_groups_of

FIXED_POLICIES = ("atomic", "op", "layer", "model")

# Activation entries each stage kind reads and writes (see stagejax.stages).
READS = {
    "embed": (), "attn_norm": ("x",), "ffn_norm": ("x",), "final_norm": ("x",),
    "q": ("h",), "k": ("h",), "v": ("h",), "attn": ("q", "k_new", "v_new", "attn"),
    "o": ("attn", "x"), "ffn": ("h", "x"), "head": ("h",),
}
WRITES = {
    "embed": ("x",), "attn_norm": ("h",), "ffn_norm": ("h",), "final_norm": ("h",),
    "q": ("q",), "k": ("k_new",), "v": ("v_new",), "attn": ("attn",), "o": ("x",),
    "ffn": ("x",), "head": ("logits",),
}
SCORING_HEAD_STATE = ("nll_m", "nll_s", "nll_target")


@dataclasses.dataclass(frozen=True)
class Group:
    """Consecutive stages run as one jitted unit."""

    stages: tuple[Stage, ...]

    @property
    def id(self) -> str:
        first, last = self.stages[0].id, self.stages[-1].id
        return first if first == last else f"{first}..{last}"

    @property
    def kind(self) -> str:
        """"embed", "attn_blocks" (attention only, one layer: loops over KV blocks) or "fused"."""
        kinds = {s.kind for s in self.stages}
        if kinds == {"embed"}:
            return "embed"
        if kinds == {"attn"} and len({s.layer for s in self.stages}) == 1:
            return "attn_blocks"
        return "fused"

    @property
    def weight_keys(self) -> tuple[str, ...]:
        return tuple(k for s in self.stages for k in s.weight_keys)

    def state_entries(self, scoring: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(written, read-only) activation entries, in a stable order."""
        written, read = [], []
        for s in self.stages:
            w = WRITES[s.kind]
            if s.kind == "head" and scoring:
                w = SCORING_HEAD_STATE
            written += [e for e in w if e not in written]
            reads = READS[s.kind] + (SCORING_HEAD_STATE if s.kind == "head" and scoring else ())
            read += [e for e in reads if e not in read]
        read_only = tuple(e for e in read if e not in written)
        return tuple(written), read_only

    @property
    def kv_layers(self) -> tuple[int, ...]:
        """Layers whose past KV this group reads."""
        return tuple(sorted({s.layer for s in self.stages if s.kind == "attn"}))


def streams_weights(group: Group) -> bool:
    """Whether a group takes a unit from the prefetcher (embed reads its rows on demand)."""
    return group.kind != "embed" and bool(group.weight_keys)


def group_stages(stages: Sequence[Stage], policy: str, config: ModelConfig) -> list[Group]:
    """The groups of a fixed policy, in execution order."""
    if policy not in FIXED_POLICIES:
        raise ValueError(f"unknown schedule.policy {policy!r}; fixed policies: {', '.join(FIXED_POLICIES)}")
    if policy == "model":
        return [Group(tuple(stages))]
    if policy == "atomic":
        return [Group((s,)) for s in stages]
    groups: list[list[Stage]] = []
    for stage in stages:
        key = _group_key(stage, policy)
        if groups and groups[-1][0].kind != "embed" and _group_key(groups[-1][0], policy) == key:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return [Group(tuple(g)) for g in groups]


def _group_key(stage: Stage, policy: str):
    """Stages with equal keys, adjacent, share a group. `op`: one op of one layer; `layer`: one
    layer (final_norm and the head chunks form the last group)."""
    if policy == "op":
        return (stage.layer, stage.kind)
    return ("embed",) if stage.kind == "embed" else (stage.layer,)


def kv_flush_points(groups: Sequence[Group], config: ModelConfig) -> dict[int, tuple[int, ...]]:
    """For each group index, the layers whose new keys/values must be written to the cache
    after it runs: the group holding the layer's last k or v stage."""
    last_group_of_layer: dict[int, int] = {}
    for gi, group in enumerate(groups):
        for s in group.stages:
            if s.kind in ("k", "v"):
                last_group_of_layer[s.layer] = gi
    points: dict[int, list[int]] = {}
    for layer, gi in last_group_of_layer.items():
        points.setdefault(gi, []).append(layer)
    return {gi: tuple(sorted(layers)) for gi, layers in points.items()}


@dataclasses.dataclass
class GroupPlan:
    """One row of the plan: what a group holds in memory while it runs."""

    group_id: str
    kind: str
    n_stages: int
    weight_bytes: int  # the group's own weights
    activation_bytes: int
    kv_bytes: int  # its KV read, and a RAM cache's resident rows
    prefetch_bytes: int  # buffers of the units read ahead
    buffer_bytes: int = 0  # the buffer holding its weights (a slab: >= weight_bytes), 0 = weight_bytes
    dequant_bytes: int = 0  # float32 temporary of its largest quantized matrix, dequantized in-jit
    # XLA's temporaries (`xla_scratch_bytes`) live while it runs: its own and, in a pass of
    # many tokens, the previous group's (`lingering_scratch`)
    scratch_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return (max(self.weight_bytes, self.buffer_bytes) + self.activation_bytes + self.kv_bytes
                + self.prefetch_bytes + self.dequant_bytes + self.scratch_bytes)


def _entry_elements(config: ModelConfig, tokens: int) -> dict[str, int]:
    """Float32 elements of each activation entry of a pass of `tokens` tokens (`stages.init_state`)."""
    t, d, n, k, h = tokens, config.d_model, config.n_heads, config.n_kv_heads, config.head_dim
    return {"x": t * d, "h": t * d, "q": t * n * h, "k_new": t * k * h, "v_new": t * k * h,
            "attn": t * n * h, "logits": config.vocab_size, "nll_m": t, "nll_s": t, "nll_target": t}


def pass_state_bytes(config: ModelConfig, tokens: int, scoring: bool = False) -> int:
    """A pass's whole activation state (`stages.init_state`)."""
    entries = ("x", "h", "q", "k_new", "v_new", "attn") + (SCORING_HEAD_STATE if scoring else ("logits",))
    sizes = _entry_elements(config, tokens)
    return 4 * sum(sizes[e] for e in entries)


def resident_state_bytes(config: ModelConfig, tokens: int, scoring: bool = False) -> int:
    """Activations in RAM: what stays resident through every group of a pass. The executor
    keeps each pass kind's state between passes, so a prefill or scoring pass also holds the
    one-token decode state (made by the dry run)."""
    held = pass_state_bytes(config, tokens, scoring)
    if (tokens, scoring) != (1, False):
        held += pass_state_bytes(config, 1)
    return held


def activation_bytes(group: Group, config: ModelConfig, tokens: int, scoring: bool = False,
                     resident_state: int = 0) -> int:
    """A group's activations: the state entries it reads and writes (with activations in
    external memory only those are loaded), or the pass's `resident_state` when larger (in
    RAM, every entry stays), plus attention's online-softmax carry, (m, l, acc) per token and head."""
    sizes = _entry_elements(config, tokens)
    written, read_only = group.state_entries(scoring)
    own = 4 * sum(sizes[e] for e in set(written) | set(read_only))
    carry = sum(tokens * (2 + config.head_dim) for s in group.stages if s.kind == "attn")
    return max(own, resident_state) + 4 * carry


SCRATCH_FLOOR_BYTES = 4096


def xla_scratch_bytes(group: Group, config: ModelConfig, tokens: int, kv_block: int,
                      past_rows: int, scoring: bool = False, layout: ChunkLayout | None = None) -> int:
    """Bytes of XLA temporaries (`compiled.memory_analysis().temp_size_in_bytes`) a group needs
    beyond its arguments and outputs: an upper bound of the compiled figure
    (tests/test_planner.py checks it against the executables).

    Attention dominates. One call over S rows for n query heads of k kv groups
    (ops.online_softmax_update) materialises, float32: the value sum's operand — a decode
    step's multiply-reduce holds probabilities x values [T, S, n, H]; a dot (more query rows)
    the block transposed, [S, k, H] keys and values — or the dequantized / transposed past,
    whichever is larger, plus scores and probabilities [T, n, S] a few times over. S is one KV
    block for blocked attention (`attn_blocks`) and the whole past (`past_rows`) for attention
    fused with other stages; a fused run of a layer's every head is one batched call
    (n = n_heads), fewer heads are one call each, all of whose temporaries may be live at once
    (XLA orders independent work freely). At SmolLM2's shapes and a 512-row past
    a layer's attention holds ~1.2 MB, as much as a projection's weights.
    Other stages hold small vectors: each stage's output [T, D] before it is accumulated
    (XLA computes a group's independent chunk outputs first) and, with FFN chunks, their
    inner activations, at most gate and up over the FFN's whole width. A scoring pass's head
    chunks materialise their logits [T, rows] to fold into the running log-sum-exp, every
    chunk's at once at worst, and one more for the exponentials (rows from `layout`; the whole
    vocabulary without it). Plus XLA's own small buffers (scalars, indices, alignment):
    `SCRATCH_FLOOR_BYTES`.
    """
    t = tokens
    small = t * config.d_model * len(group.stages)
    if any(s.kind == "ffn" for s in group.stages):
        small += 2 * t * config.ffn_dim
    if scoring:
        rows = [(layout.vocab_bounds[s.index + 1] - layout.vocab_bounds[s.index]) if layout
                else config.vocab_size for s in group.stages if s.kind == "head"]
        small += t * (sum(rows) + max(rows, default=0))
    heads = [s for s in group.stages if s.kind == "attn"]
    if not heads:
        return SCRATCH_FLOOR_BYTES + 4 * small
    h = config.head_dim
    if group.kind == "attn_blocks":
        rows, n = kv_block, len(heads)
        k = kv_groups_of(config, n)
    else:
        rows = past_rows
        per_layer: dict[int, int] = {}
        for s in heads:
            per_layer[s.layer] = per_layer.get(s.layer, 0) + 1
        n = max(per_layer.values())
        # A layer's every head is one batched call over its k kv groups; fewer heads are
        # separate calls that XLA may run side by side, each over its own group's rows.
        k = config.n_kv_heads if n == config.n_heads else n
    many_rows = t * (n // k) > ops.FEW_QUERY_ROWS
    value_sum = 2 * rows * k * h if many_rows else t * rows * n * h
    past = 2 * rows * k * h  # keys and values as float32 [S, k, H]
    return SCRATCH_FLOOR_BYTES + 4 * (max(value_sum, past) + 4 * t * n * rows + small)


def lingering_scratch(tokens: int) -> bool:
    """Whether a pass of `tokens` tokens holds a group's XLA temporaries into the next group.

    XLA runs a pass over many tokens on its worker threads, and a worker frees the
    executable's temporaries after the outputs are ready: the caller sees them for up to
    ~0.5 ms after the group returns, long enough for the next group to allocate its own
    (a 2,048-token scoring window of 64-token passes: one layer's 12.4 MB still resident
    after ~15% of its groups, whichever XLA CPU flags were set). One-token steps show it
    too, but small (SmolLM2 atomic at a 450-token past: 51 of 4,592 groups, at most 0.4 MB),
    within what runs are allowed beyond their plan, and not charged there: it would count a
    `layer` step's attention temporaries twice in every decode plan for that.
    """
    return tokens > 1


def kv_read_bytes(group: Group, config: ModelConfig, kv_block_bytes, layer_past_bytes) -> int:
    """KV bytes resident while the group runs: one block (blocked attention) or whole pasts."""
    if group.kind == "attn_blocks":
        return kv_block_bytes(kv_groups_of(config, len(group.stages)))
    return layer_past_bytes * len(group.kv_layers)


def plan_groups(groups: Sequence[Group], config: ModelConfig, weight_bytes_of, tokens: int,
                prefetch_depth: int, kv_block_bytes, layer_past_bytes: int,
                slab_bytes: int = 0, dequant_bytes_of=None,
                kv_buffer_persists: bool = False, scratch_bytes_of=None,
                resident_kv_bytes: int = 0, scoring: bool = False,
                resident_state: int = 0) -> list[GroupPlan]:
    """Memory accounting of every group (design §5): `weight_bytes_of(keys)` gives stored
    bytes; the embed group holds only its tokens' rows. With `slab_bytes` (the prefetcher
    reads every unit into one of depth + 1 slabs of that size), a streamed group's weights
    occupy a slab and each unit in flight another. `dequant_bytes_of(keys)`: the float32
    temporary of a group's largest quantized matrix (quantized checkpoints).
    `kv_buffer_persists` (a cache on disk): KV reads land in one buffer that the cache keeps
    between groups, as large as the plan's largest read, so every group is charged that.
    `scratch_bytes_of(group)`: XLA's temporaries inside its executable (`xla_scratch_bytes`).
    `resident_kv_bytes`: a cache in RAM, every layer's written rows, held through every group
    (`kv_store.resident_cache_bytes`) on top of the group's own read. `scoring`: a perplexity
    pass (the head keeps NLL accumulators, not logits); `resident_state`: activations held in
    RAM through every group (`resident_state_bytes`; 0 with activations in external memory).
    In a pass of more than one token each group is also charged its predecessor's XLA
    temporaries (`lingering_scratch`)."""
    kv = [kv_read_bytes(g, config, kv_block_bytes, layer_past_bytes) for g in groups]
    if kv_buffer_persists and kv:
        kv = [max(kv)] * len(kv)
    kv = [k + resident_kv_bytes for k in kv]
    streamed = [weight_bytes_of(g.weight_keys) if streams_weights(g) else 0 for g in groups]
    units = [i for i, g in enumerate(groups) if streams_weights(g)]
    scratch = [scratch_bytes_of(g) if scratch_bytes_of else 0 for g in groups]
    if lingering_scratch(tokens):
        # Passes repeat the sequence (decode steps, prefill and scoring windows): the first
        # group follows the last.
        scratch = [own + scratch[i - 1] for i, own in enumerate(scratch)]
    rows = []
    for i, group in enumerate(groups):
        if group.kind == "embed":
            w = tokens * config.d_model * 4 * (2 if config.family == "gpt2" else 1)
        else:
            w = streamed[i]
        ahead = 0
        if prefetch_depth and units:
            if slab_bytes:
                ahead = prefetch_depth * slab_bytes
            else:
                # The next `depth` units (cyclically, across steps) are in flight.
                position = next((j for j, u in enumerate(units) if u >= i), 0)
                if units[position] == i:
                    position += 1
                ahead = sum(streamed[units[(position + j) % len(units)]] for j in range(prefetch_depth))
        buffer = slab_bytes if streamed[i] else 0
        rows.append(GroupPlan(group.id, group.kind, len(group.stages), w,
                              activation_bytes(group, config, tokens, scoring, resident_state),
                              kv[i], ahead,
                              buffer, dequant_bytes_of(group.weight_keys) if dequant_bytes_of else 0,
                              scratch[i]))
    return rows
