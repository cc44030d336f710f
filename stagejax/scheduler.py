"""Grouping atomic stages into jitted units, and the plan's memory accounting (design §5).

Fixed policies:
  atomic — every stage alone (attention: one head, looping over KV blocks);
  op     — all heads / groups / chunks of one op together (attention: all heads of a layer,
           looping over KV blocks);
  layer  — every stage of a layer in one unit (attention over the layer's whole past);
  model  — the classic baseline: one group of every stage, its weights resident (loaded once),
           one jit per step (run by `engine.ResidentDecoder`).
`embed` is always its own unit: its weights are the rows of this step's tokens, read on demand
(an `on_demand` kind of `stagejax.stage_kinds`; the scheduler reads every kind's facts there).

Budget accounting (what a group holds while it runs): its weights + the activations it reads
and writes + the KV it reads (one block, or its layer's whole past when attention is fused with
other stages) + the weights of the next `prefetch_depth` units being read ahead.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

from stagejax.model_config import ModelConfig
from stagejax.models import ops
from stagejax.stage_kinds import KINDS, kv_groups_of
from stagejax.stages import ChunkLayout, Stage

FIXED_POLICIES = ("atomic", "op", "layer", "model")
RESIDENT_POLICIES = ("model",)  # plans whose one group holds every weight, loaded once


@dataclasses.dataclass(frozen=True)
class Group:
    """Consecutive stages run as one jitted unit."""

    stages: tuple[Stage, ...]
    resident: bool = False  # its weights are loaded once and held (the `model` plan), not streamed

    # The plan's accounting and the executor's compile ask these of every group several times
    # (SmolLM2 `atomic`: ~35,000 `kind` lookups per run); a frozen group's answers never change.
    @functools.cached_property
    def id(self) -> str:
        first, last = self.stages[0].id, self.stages[-1].id
        return first if first == last else f"{first}..{last}"

    @functools.cached_property
    def kind(self) -> str:
        """"embed" (an `on_demand` kind's stage: rows read as it runs), "attn_blocks" (`reads_kv`
        stages only, of one layer: loops over KV blocks) or "fused"."""
        kinds = [KINDS[s.kind] for s in self.stages]
        if all(k.on_demand for k in kinds):
            return "embed"
        if all(k.reads_kv for k in kinds) and len({s.layer for s in self.stages}) == 1:
            return "attn_blocks"
        return "fused"

    @functools.cached_property
    def weight_keys(self) -> tuple[str, ...]:
        return tuple(k for s in self.stages for k in s.weight_keys)

    def state_entries(self, scoring: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(written, read-only) activation entries, in a stable order."""
        return self._state_entries[scoring]

    @functools.cached_property
    def _state_entries(self) -> dict[bool, tuple[tuple[str, ...], tuple[str, ...]]]:
        return {scoring: self._entries_of_pass(scoring) for scoring in (False, True)}

    def _entries_of_pass(self, scoring: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
        written, read = [], []
        for s in self.stages:
            kind = KINDS[s.kind]
            written += [e for e in kind.writes_in(scoring) if e not in written]
            read += [e for e in kind.reads_in(scoring) if e not in read]
        read_only = tuple(e for e in read if e not in written)
        return tuple(written), read_only

    @functools.cached_property
    def kv_layers(self) -> tuple[int, ...]:
        """Layers whose past KV this group reads."""
        return tuple(sorted({s.layer for s in self.stages if KINDS[s.kind].reads_kv}))


def streams_weights(group: Group) -> bool:
    """Whether a group takes a unit from the prefetcher (embed reads its rows on demand; a
    resident group's weights are loaded once)."""
    return not group.resident and group.kind != "embed" and bool(group.weight_keys)


def group_stages(stages: Sequence[Stage], policy: str, config: ModelConfig) -> list[Group]:
    """The groups of a fixed policy, in execution order."""
    if policy not in FIXED_POLICIES:
        raise ValueError(f"unknown schedule.policy {policy!r}; fixed policies: {', '.join(FIXED_POLICIES)}")
    if policy == "model":
        return [Group(tuple(stages), resident=True)]
    if policy == "atomic":
        return [Group((s,)) for s in stages]
    groups: list[list[Stage]] = []
    for stage in stages:
        key = _group_key(stage, policy)
        if groups and not KINDS[groups[-1][0].kind].on_demand and _group_key(groups[-1][0], policy) == key:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return [Group(tuple(g)) for g in groups]


def _group_key(stage: Stage, policy: str):
    """Stages with equal keys, adjacent, share a group. `op`: one op of one layer; `layer`: one
    layer (final_norm and the head chunks form the last group)."""
    if policy == "op":
        return (stage.layer, stage.kind)
    return (stage.kind,) if KINDS[stage.kind].on_demand else (stage.layer,)


def kv_flush_points(groups: Sequence[Group], config: ModelConfig) -> dict[int, tuple[int, ...]]:
    """For each group index, the layers whose new keys/values must be written to the cache
    after it runs: the group holding the layer's last stage that `writes_kv`."""
    last_group_of_layer: dict[int, int] = {}
    for gi, group in enumerate(groups):
        for s in group.stages:
            if s.writes_kv:
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
    entries = ("x", "h", "q", "k_new", "v_new", "attn") + (
        ("nll_m", "nll_s", "nll_target") if scoring else ("logits",))
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
    carry = sum(tokens * (2 + config.head_dim) for s in group.stages if KINDS[s.kind].reads_kv)
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
    # Stages of different layers depend on each other in sequence: one layer's outputs at most
    # are live at once (only the resident plan's group spans layers).
    per_layer: dict = {}
    for s in group.stages:
        per_layer[s.layer] = per_layer.get(s.layer, 0) + 1
    small = t * config.d_model * max(per_layer.values())
    for kind in dict.fromkeys(KINDS[s.kind] for s in group.stages):
        if kind.scratch:
            widths = [_chunk_rows(s, kind, config, layout) for s in group.stages if s.kind == kind.name]
            small += kind.scratch(config, t, widths, scoring)
    heads = [s for s in group.stages if KINDS[s.kind].reads_kv]
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


def _chunk_rows(stage: Stage, kind, config: ModelConfig, layout: ChunkLayout | None) -> int:
    """Columns of an FFN chunk or rows of a vocabulary chunk (the whole width without `layout`)."""
    if kind.chunks is None:
        return 0
    if layout is None:
        return config.ffn_dim if kind.chunks == "ffn" else config.vocab_size
    bounds = layout.ffn_bounds if kind.chunks == "ffn" else layout.vocab_bounds
    return bounds[stage.index + 1] - bounds[stage.index]


def embed_rows_bytes(config: ModelConfig, tokens: int) -> int:
    """What the embedding group holds: its tokens' float32 rows (and their positions')."""
    return tokens * config.d_model * 4 * config.traits.embed_rows_per_token


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


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """What a plan's memory depends on besides its groups: the one place per-group bytes are
    computed (design §5), for the planner packing groups under a budget, the staged executor's
    plan and the resident `model` plan alike.

    weight_bytes_of(keys): stored bytes of weight arrays; the embed group holds only its tokens'
      rows. A `resident` group holds its weights throughout; a streamed one in a slab.
    kv_block_bytes(n_groups), layer_past_bytes: a blocked attention's KV read, and one layer's
      whole past as attention fused with other stages reads it.
    prefetch_depth: units read ahead while a group runs.
    dequant_bytes_of(keys): the float32 temporary of a group's largest quantized matrix,
      dequantized inside its jit (quantized checkpoints).
    kv_buffer_persists (a cache on disk): KV reads land in one buffer the cache keeps between
      groups, as large as the plan's largest read, so every group is charged that.
    resident_kv_bytes: a cache in RAM, every layer's written rows, held through every group
      (`kv_store.resident_cache_bytes`) on top of the group's own read.
    scratch_bytes_of(group, tokens, scoring): XLA's temporaries inside its executable
      (`xla_scratch_bytes`); in a pass of more than one token each group is also charged its
      predecessor's (`lingering_scratch`).
    activations_in_ram: the pass's whole activation state stays resident through every group
      (`resident_state_bytes`); else (external memory) a group holds only the entries it uses.
    """

    config: ModelConfig
    weight_bytes_of: Callable[[Sequence[str]], int]
    kv_block_bytes: Callable[[int], int]
    layer_past_bytes: int
    prefetch_depth: int = 0
    dequant_bytes_of: Callable[[Sequence[str]], int] | None = None
    kv_buffer_persists: bool = False
    resident_kv_bytes: int = 0
    scratch_bytes_of: Callable[[Group, int, bool], int] | None = None
    activations_in_ram: bool = True

    def kv_read_bytes(self, group: Group) -> int:
        return kv_read_bytes(group, self.config, self.kv_block_bytes, self.layer_past_bytes)

    def held_weight_bytes(self, group: Group, tokens: int) -> int:
        """The weights a group holds while it runs (without the slab around streamed ones)."""
        if group.kind == "embed":
            return embed_rows_bytes(self.config, tokens)
        # Distinct arrays: in a resident group a tied head's chunks are the embedding's.
        keys = tuple(dict.fromkeys(group.weight_keys))
        return self.weight_bytes_of(keys) if keys else 0

    def scratch_bytes(self, group: Group, tokens: int, scoring: bool) -> int:
        return self.scratch_bytes_of(group, tokens, scoring) if self.scratch_bytes_of else 0

    def row(self, group: Group, tokens: int, scoring: bool = False, *, ahead: int = 0,
            buffer: int = 0, kv_buffer: int = 0, lingering: int = 0) -> GroupPlan:
        """One group's accounting: `ahead` bytes read ahead, its weights in a `buffer` (slab)
        of that size (0: its own bytes), a persistent KV buffer of at least `kv_buffer`, and
        `lingering` bytes of the previous group's XLA temporaries (passes of many tokens)."""
        kv = self.kv_read_bytes(group)
        if self.kv_buffer_persists:
            kv = max(kv, kv_buffer)
        held_state = resident_state_bytes(self.config, tokens, scoring) if self.activations_in_ram else 0
        scratch = self.scratch_bytes(group, tokens, scoring)
        if lingering_scratch(tokens):
            scratch += lingering
        return GroupPlan(group.id, group.kind, len(group.stages), self.held_weight_bytes(group, tokens),
                         activation_bytes(group, self.config, tokens, scoring, held_state),
                         kv + self.resident_kv_bytes, ahead, buffer,
                         self.dequant_bytes_of(group.weight_keys) if self.dequant_bytes_of else 0,
                         scratch)

    def plan(self, groups: Sequence[Group], tokens: int, scoring: bool = False,
             slab_bytes: int = 0) -> list[GroupPlan]:
        """Every group of a pass of `tokens` tokens (a perplexity pass if `scoring`). With
        `slab_bytes` (the prefetcher reads every unit into one of depth + 1 slabs of that size)
        a streamed group's weights occupy a slab and each unit in flight another; without, the
        next `prefetch_depth` units' own bytes are in flight (cyclically, across steps)."""
        kv_buffer = max((self.kv_read_bytes(g) for g in groups), default=0)
        streamed = [self.weight_bytes_of(g.weight_keys) if streams_weights(g) else 0 for g in groups]
        units = [i for i, g in enumerate(groups) if streams_weights(g)]
        scratch = [self.scratch_bytes(g, tokens, scoring) for g in groups]
        rows = []
        for i, group in enumerate(groups):
            ahead = 0
            if self.prefetch_depth and units:
                if slab_bytes:
                    ahead = self.prefetch_depth * slab_bytes
                else:
                    position = next((j for j, u in enumerate(units) if u >= i), 0)
                    if units[position] == i:
                        position += 1
                    ahead = sum(streamed[units[(position + j) % len(units)]]
                                for j in range(self.prefetch_depth))
            # Passes repeat the sequence (decode steps, prefill and scoring windows): the first
            # group follows the last.
            rows.append(self.row(group, tokens, scoring, ahead=ahead,
                                 buffer=slab_bytes if streamed[i] else 0, kv_buffer=kv_buffer,
                                 lingering=scratch[i - 1]))
        return rows
