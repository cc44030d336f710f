"""The roofline cost model: FLOPs and bytes of every stage, group and step, and predicted time.

One module owns the cost model of stagejax: the
RAM-budget scheduler asks it for per-group and per-step time, and the co-design search
(`stagejax.codesign`) for whole-model prefill and decode latency. The roofline follows Williams,
Waterman & Patterson, "Roofline: an insightful visual performance model" (CACM 2009), applied to
decoder inference as in arXiv 2602.10377 (design §1): an op takes max(FLOPs / peak FLOP/s,
bytes / memory bandwidth); a staged decode adds the time to read streamed weights from storage.

Accounting conventions (per stage kind; T tokens in the pass, S = `kv_len` past tokens cached
before the pass, D width, N query heads, K kv heads, H head dim, F FFN width, V vocab; names as
in `stagejax.models.ops`):
  * A matrix product costs 2 FLOPs per weight per token (multiply + add).
  * Attention, per query head: QK^T and PV cost 4 H FLOPs per attended key; softmax (scale, max,
    exp, sum, online-softmax rescale) is counted as `SOFTMAX_FLOPS_PER_SCORE` = 5 FLOPs per
    score. Token t of the pass attends S + t + 1 keys (its past plus itself, causally), so a pass
    attends T S + T (T + 1) / 2 keys per head; a decode step (T = 1) attends S + 1.
  * Elementwise work is counted too (norms, RoPE, activations, residual adds, biases; constants
    below), so the totals match what runs; `elementwise=False` gives the matrix (and attention
    score/value) FLOPs only — the convention of the closed forms (`layer_*_d2`).
  * Weight bytes: matrices at `weight_bits` (fractional bits carry quantization scale overhead,
    see `quantized_bits`), vectors (norm scales, biases) at `vector_bits` (float32 by default:
    quantized checkpoints keep them in float). A `weight_bytes` override — the stored bytes from
    the checkpoint manifest — replaces both. `embed` reads only the T rows of this pass.
  * KV bytes: the past rows a stage reads, K and V, at `kv_bits`. One kv group is read once per
    group of stages however many query heads share it (GQA). New keys/values written to the
    cache are `kv_write_bytes`.
  * Activation bytes: what a stage reads and writes of the activation state at `act_bits`
    (a fused group reads each entry once).
  * The LM head in generation mode computes the last token's logits only; `scoring=True`
    computes every token's (the perplexity path).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping, Sequence

from stagejax.model_config import ModelConfig
from stagejax.models.family import get_family
from stagejax.op_cost import Bits, Cost
from stagejax.scheduler import Group, streams_weights
from stagejax.stage_kinds import KINDS, OpShape
from stagejax.stages import ChunkLayout, Stage


def quantized_bits(bits: int, group_size: int | None = None, scale_bits: int = 16,
                   zero_point: bool = False) -> float:
    """Effective bits per weight of a group-quantized format: `bits` plus one scale (and a
    zero point for asymmetric formats) of `scale_bits` per `group_size` weights.

    E.g. int4 with float16 scales per 32 weights: 4 + 16/32 = 4.5; GGUF Q4_1 (a float16 scale
    and minimum per 32): 4 + 32/32 = 5.0; int8 per-row scales are ~8.
    """
    if group_size is None:
        return float(bits)
    if group_size <= 0:
        raise ValueError(f"quantization group_size must be positive, got {group_size}")
    return bits + scale_bits * (2 if zero_point else 1) / group_size


# ---- devices ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Device:
    """The constants of a machine that the roofline needs (all rates per second, bytes).

    `flops_per_s` maps a compute dtype ("float32", "bfloat16", "int8", ...) to its peak.
    `matvec_bytes_per_s`, when known, is the weight-streaming rate of batch-1 matrix-vector
    products (what decode does), used for weight bytes instead of `mem_read_bytes_per_s`;
    `notes` holds per-figure sources or measured spreads.
    """

    name: str
    flops_per_s: Mapping[str, float]
    mem_read_bytes_per_s: float
    storage_read_bytes_per_s: float  # cold: every byte from the storage device
    storage_warm_bytes_per_s: float  # page-cache copy rate into a reused buffer
    call_overhead_s: float  # per jitted call (dispatch + hand-back)
    ram_bytes: float
    source: str
    matvec_bytes_per_s: float | None = None
    llc_bytes: float | None = None  # last-level cache: whether streamed units stay cache-resident
    # While a prefetch thread copies and the executor computes at once (a streamed plan), each
    # keeps this fraction of its rate alone: they share the cores and the memory bus.
    copy_contended_fraction: float = 1.0
    matvec_contended_fraction: float = 1.0
    notes: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.flops_per_s:
            raise ValueError(f"device {self.name!r}: flops_per_s needs at least one dtype")
        for dtype, value in self.flops_per_s.items():
            if not value or value <= 0:
                raise ValueError(f"device {self.name!r}: flops_per_s[{dtype!r}] must be positive, "
                                 f"got {value!r}")
        for field in ("mem_read_bytes_per_s", "storage_read_bytes_per_s",
                      "storage_warm_bytes_per_s", "ram_bytes"):
            value = getattr(self, field)
            if value is None or value <= 0:
                raise ValueError(f"device {self.name!r}: {field} must be positive, got {value!r}")
        if self.call_overhead_s is None or self.call_overhead_s < 0:
            raise ValueError(f"device {self.name!r}: call_overhead_s must be >= 0, "
                             f"got {self.call_overhead_s!r}")
        if self.matvec_bytes_per_s is not None and self.matvec_bytes_per_s <= 0:
            raise ValueError(f"device {self.name!r}: matvec_bytes_per_s must be positive or None")

    def peak_flops(self, dtype: str) -> float:
        try:
            return self.flops_per_s[dtype]
        except KeyError:
            raise ValueError(f"device {self.name!r} has no FLOP/s figure for dtype {dtype!r}; "
                             f"it has: {', '.join(sorted(self.flops_per_s))}") from None

    @property
    def weight_read_bytes_per_s(self) -> float:
        return self.matvec_bytes_per_s or self.mem_read_bytes_per_s

    def ridge_intensity(self, dtype: str = "float32") -> float:
        """FLOPs per byte above which an op is compute-bound on this device."""
        return self.peak_flops(dtype) / self.mem_read_bytes_per_s

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["flops_per_s"] = dict(self.flops_per_s)
        data["notes"] = dict(self.notes)
        return data


# ---- costs ------------------------------------------------------------------------------------


def _op_cost(kind: str, config: ModelConfig, bits: Bits, **shape) -> tuple[Cost, dict[str, float]]:
    """A kind's declared cost (`stage_kinds.KINDS`) over an `OpShape`."""
    if kind not in KINDS:
        raise ValueError(f"unknown stage kind {kind!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[kind].cost(config, bits, OpShape(**shape))


def _chunk_width(stage: Stage, layout: ChunkLayout) -> int:
    bounds = layout.ffn_bounds if KINDS[stage.kind].chunks == "ffn" else layout.vocab_bounds
    if stage.index + 1 >= len(bounds):
        raise ValueError(f"stage {stage.id} is chunk {stage.index}, but the layout has only "
                         f"{len(bounds) - 1} {stage.kind} chunks: pass the ChunkLayout the "
                         f"stages were built with (layout=...)")
    return bounds[stage.index + 1] - bounds[stage.index]


def _stored_embed_params(config: ModelConfig) -> int:
    return config.d_model * (config.vocab_size
                             + (config.max_seq_len if config.traits.learned_positions else 0))


WeightBytes = int | float | Callable[[tuple[str, ...]], float] | None


def _stage_cost_and_reads(stage: Stage, config: ModelConfig, bits: Bits, *, tokens: int,
                          kv_len: int, layout: ChunkLayout, weight_bytes: WeightBytes,
                          scoring: bool, elementwise: bool) -> tuple[Cost, dict[str, float]]:
    kind = KINDS[stage.kind]
    width = _chunk_width(stage, layout) if kind.chunks else 0
    cost, reads = _op_cost(stage.kind, config, bits, tokens=tokens, kv_len=kv_len, width=width,
                           first_chunk=stage.index == 0, scoring=scoring,
                           elementwise=elementwise)
    if weight_bytes is not None:
        stored = weight_bytes(stage.weight_keys) if callable(weight_bytes) else weight_bytes
        if kind.on_demand:  # the stored table; this pass reads its rows only
            stored = stored * cost.weight_params / _stored_embed_params(config)
        cost = cost.replace(weight_bytes=float(stored))
    return cost.replace(n_calls=1), reads


def stage_cost(stage: Stage, config: ModelConfig, *, tokens: int = 1, kv_len: int,
               weight_bytes: WeightBytes = None, weight_bits: float = 32, kv_bits: float = 32,
               act_bits: float = 32, vector_bits: float = 32, layout: ChunkLayout | None = None,
               kv_block: int | None = None, scoring: bool = False,
               elementwise: bool = True) -> Cost:
    """FLOPs and bytes of one atomic stage for a pass of `tokens` tokens after `kv_len` cached.

    Args:
      stage: a stage of `stagejax.stages.build_stages(config, layout)`.
      weight_bytes: stored bytes of the stage's weights (e.g. from the manifest, so quantization
        scales count), or a function of the stage's weight keys; None: params x bits.
      layout: the chunk layout the stages were built with (default: one FFN chunk, the whole
        vocabulary).
      kv_block: for an attention stage, the KV rows per block read: n_calls becomes
        ceil(kv_len / kv_block) as the executor loops over blocks (one call if None).
      scoring: the LM head scores every token (perplexity) instead of the last one.
    """
    _check_pass(tokens, kv_len)
    layout = layout or ChunkLayout.create(config)
    bits = Bits(weight_bits, vector_bits, kv_bits, act_bits)
    cost, reads = _stage_cost_and_reads(stage, config, bits, tokens=tokens, kv_len=kv_len,
                                        layout=layout, weight_bytes=weight_bytes, scoring=scoring,
                                        elementwise=elementwise)
    calls = _attention_calls(kv_len, kv_block) if KINDS[stage.kind].reads_kv and kv_block else 1
    return cost.replace(act_read_bytes=sum(reads.values()), n_calls=calls)


def _check_pass(tokens: int, kv_len: int) -> None:
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    if kv_len < 0:
        raise ValueError(f"kv_len (past tokens attended) must be >= 0, got {kv_len}")


def _attention_calls(kv_len: int, kv_block: int) -> int:
    if kv_block <= 0:
        raise ValueError(f"kv_block must be positive, got {kv_block}")
    return max(1, -(-kv_len // kv_block))  # the executor runs at least one (finishing) call


def _read_key(stage: Stage, entry: str, queries_per_kv_head: int) -> tuple:
    """Which value of the activation state a stage reads: stages of a group reading the same
    value (q/k/v heads reading one normed h, FFN chunks reading h, head chunks reading the final
    h) count it once; the same entry name in another layer or sub-block is another value."""
    kind = KINDS[stage.kind]
    if kind.shared_input:
        return entry, stage.layer, kind.shared_input
    if kind.reads_kv:
        if entry == "q":
            return entry, stage.layer, stage.index
        return entry, stage.layer, "kv_group", stage.index // queries_per_kv_head
    return entry, stage.layer, stage.kind


def group_cost(group: Group, config: ModelConfig, *, tokens: int = 1, kv_len: int,
               weight_bytes: WeightBytes = None, weight_bits: float = 32, kv_bits: float = 32,
               act_bits: float = 32, vector_bits: float = 32, layout: ChunkLayout | None = None,
               kv_block: int | None = None, scoring: bool = False,
               elementwise: bool = True) -> Cost:
    """FLOPs and bytes of a group of stages run as one unit (`stagejax.scheduler.Group`).

    The sum of its stages, except: each activation entry is read once, each (layer, kv group)
    of the KV cache is read once however many query heads share it, and `n_calls` is 1 for a
    fused group, or ceil(kv_len / kv_block) for an attention-only group (the executor loops over
    KV blocks; `kv_block` None means one block). `weight_bytes` is the group's stored bytes
    (an int), or a function of weight keys applied per stage.
    """
    _check_pass(tokens, kv_len)
    layout = layout or ChunkLayout.create(config)
    bits = Bits(weight_bits, vector_bits, kv_bits, act_bits)
    total, reads = Cost(), {}
    seen_kv: set[tuple[int, int]] = set()
    g = config.queries_per_kv_head
    for stage in group.stages:
        cost, stage_reads = _stage_cost_and_reads(
            stage, config, bits, tokens=tokens, kv_len=kv_len, layout=layout,
            weight_bytes=weight_bytes if callable(weight_bytes) else None, scoring=scoring,
            elementwise=elementwise)
        if KINDS[stage.kind].reads_kv:
            kv_group = (stage.layer, stage.index // g)
            if kv_group in seen_kv:  # this kv group's past and own k/v are already counted
                cost = cost.replace(kv_bytes=0.0)
                stage_reads = {"q": stage_reads["q"]}
            seen_kv.add(kv_group)
        for entry, nbytes in stage_reads.items():
            key = _read_key(stage, entry, g)
            reads[key] = max(reads.get(key, 0.0), nbytes)
        total = total + cost
    if weight_bytes is not None and not callable(weight_bytes):
        stored = float(weight_bytes)
        if group.kind == "embed":
            stored = stored * total.weight_params / _stored_embed_params(config)
        total = total.replace(weight_bytes=stored)
    if group.kind == "attn_blocks":
        calls = _attention_calls(kv_len, kv_block) if kv_block else 1
    else:
        calls = 1
    return total.replace(act_read_bytes=sum(reads.values()), n_calls=calls)


def plan_costs(groups: Sequence[Group], config: ModelConfig, **kwargs) -> tuple[list[Cost], list[bool]]:
    """`group_cost` of every group of a plan (same keyword arguments), and whether each group
    takes its weights from the prefetcher (`stagejax.scheduler.streams_weights`) — the two
    lists `predict_step` takes."""
    return ([group_cost(g, config, **kwargs) for g in groups], [streams_weights(g) for g in groups])


# ---- whole-model accounting --------------------------------------------------------------------


def model_step_cost(config: ModelConfig, *, phase: str = "decode", tokens: int | None = None,
                    kv_len: int = 0, weight_bits: float = 32, kv_bits: float = 32,
                    act_bits: float = 32, vector_bits: float = 32, scoring: bool = False,
                    ffn_active_fraction: float = 1.0, elementwise: bool = True,
                    breakdown: bool = False):
    """FLOPs and bytes of one pass of the whole model as one unit (the `model` schedule).

    Args:
      phase: "decode" (tokens defaults to 1) or "prefill" (`tokens` = prompt tokens in the pass).
      kv_len: past tokens already cached (decode: the context so far; prefill: usually 0).
      ffn_active_fraction: mixture-of-experts, analytically: the fraction f of FFN weights each
        token uses (top-k / experts). FFN FLOPs scale by f; FFN weight bytes by the fraction of
        experts a pass of T tokens touches under uniform, independent routing, 1 - (1 - f)^T
        (decode: f; a 1024-token prefill: ~1). The router's own cost is ignored.
      breakdown: also return {op kind: Cost} (FFN under "ffn", attention under "attn", ...).
    Returns: Cost with n_calls = 1 (or (Cost, breakdown)).
    """
    if phase not in ("decode", "prefill"):
        raise ValueError(f"phase must be 'decode' or 'prefill', got {phase!r}")
    if tokens is None:
        if phase == "prefill":
            raise ValueError("a prefill cost needs tokens= (the prompt tokens in the pass)")
        tokens = 1
    _check_pass(tokens, kv_len)
    if not 0 < ffn_active_fraction <= 1:
        raise ValueError(f"ffn_active_fraction must be in (0, 1], got {ffn_active_fraction}")
    bits = Bits(weight_bits, vector_bits, kv_bits, act_bits)
    kw = dict(tokens=tokens, kv_len=kv_len, scoring=scoring, elementwise=elementwise)
    n, k, layers = config.n_heads, config.n_kv_heads, config.n_layers
    parts: dict[str, Cost] = {}

    def add(kind: str, cost_reads: tuple[Cost, dict], times: int = 1) -> None:
        cost, reads = cost_reads
        cost = cost.replace(act_read_bytes=sum(reads.values()))
        scaled = Cost(**{f.name: getattr(cost, f.name) * times for f in dataclasses.fields(Cost)})
        parts[kind] = parts.get(kind, Cost()) + scaled

    units = {"heads": n, "kv_heads": k, None: 1}
    widths = {"ffn": config.ffn_dim, "vocab": config.vocab_size, None: 0}
    for kind in KINDS.values():
        cost, reads = kind.cost(config, bits, OpShape(units=units[kind.units], kv_groups=k,
                                                      width=widths[kind.chunks], **kw))
        if kind.chunks == "ffn" and ffn_active_fraction < 1:
            touched = 1 - (1 - ffn_active_fraction) ** tokens
            cost = cost.replace(flops=cost.flops * ffn_active_fraction,
                                weight_bytes=cost.weight_bytes * touched,
                                weight_params=cost.weight_params * touched)
        add(kind.op, (cost, reads), layers if kind.scope == "layer" else 1)
    total = sum(parts.values(), Cost()).replace(n_calls=1)
    return (total, parts) if breakdown else total


# ---- closed forms per layer, normalised by d^2 ------------------------------------------------
# A layer of width d with query heads covering q_width = head_ratio * d, kv heads a fraction
# kv_ratio = K / N of the query heads, and FFN width r * d. Matrix weights only (norm scales and
# biases are O(d), vanishing against d^2); 2 FLOPs per weight per token; attention scores/values
# 4 H FLOPs per attended key per head, i.e. 4 * attended * q_width in total.


def layer_decode_weight_params_d2(r: float, *, kv_ratio: float = 1.0, head_ratio: float = 1.0,
                                  family: str = "llama") -> float:
    """Weight parameters a decode step reads per layer / d^2.

    q and o head_ratio each, k and v head_ratio * kv_ratio each, the FFN 3 r (SwiGLU: gate, up,
    down; d/dr = 3) or 2 r (a GELU MLP: up, down) -> 2 h + 2 h g + 3 r. GPT-2 (no GQA, N H = d)
    is head_ratio = kv_ratio = 1: 4 + 2 r.
    """
    ffn_matrices = 3 if get_family(family).gated_ffn else 2
    return 2 * head_ratio + 2 * head_ratio * kv_ratio + ffn_matrices * r


def layer_decode_weight_bytes_d2(r: float, bytes_per_weight: float, **kwargs) -> float:
    """Weight bytes a decode step reads per layer / d^2 (d/dr = 3 x bytes per weight, SwiGLU)."""
    return bytes_per_weight * layer_decode_weight_params_d2(r, **kwargs)


def layer_flops_per_token_d2(r: float, *, kv_ratio: float = 1.0, head_ratio: float = 1.0,
                             family: str = "llama", attended: float = 0.0,
                             d_model: int | None = None) -> float:
    """Matrix and attention FLOPs per token per layer / d^2.

    2 x `layer_decode_weight_params_d2` (d/dr = 6 for SwiGLU, 4 for GPT-2's MLP) plus attention
    4 * attended * head_ratio / d, where `attended` is the keys the token attends (a decode
    step after S cached tokens: S + 1); `d_model` is needed when attended > 0.
    """
    flops = 2.0 * layer_decode_weight_params_d2(r, kv_ratio=kv_ratio, head_ratio=head_ratio,
                                                family=family)
    if attended:
        if not d_model:
            raise ValueError("the attention term of layer_flops_per_token_d2 needs d_model")
        flops += 4.0 * attended * head_ratio / d_model
    return flops


# ---- predicted time ----------------------------------------------------------------------------


def predict_parts(cost: Cost, device: Device, *, streamed: bool, warm: bool = True,
                  dtype: str = "float32", kv_on_disk: bool = False) -> tuple[float, float]:
    """(compute_s, load_s) of one unit.

    compute_s = max(FLOPs / peak[dtype], memory time) + n_calls x call overhead, where the
    memory time reads weights at the device's matrix-vector rate (or memory bandwidth) and KV
    and activations at memory bandwidth; with `kv_on_disk` the KV bytes are copied from the
    page cache first, in the compute thread (the executor reads KV blocks synchronously).
    load_s = the weight bytes from storage (page-cache copy rate if `warm`, else the cold
    storage rate) when the unit's weights are `streamed`, else 0.
    """
    other_bytes = cost.bytes_moved - cost.weight_bytes
    memory_s = (cost.weight_bytes / device.weight_read_bytes_per_s
                + other_bytes / device.mem_read_bytes_per_s)
    compute_s = max(cost.flops / device.peak_flops(dtype), memory_s) + cost.n_calls * device.call_overhead_s
    if kv_on_disk:
        compute_s += cost.kv_bytes / device.storage_warm_bytes_per_s
    load_s = 0.0
    if streamed:
        load_s = cost.weight_bytes / (device.storage_warm_bytes_per_s if warm
                                      else device.storage_read_bytes_per_s)
    return compute_s, load_s


def predict_time(cost: Cost, device: Device, *, streamed: bool, warm: bool = True,
                 dtype: str = "float32", kv_on_disk: bool = False) -> float:
    """Predicted seconds of one unit run alone: its load (if streamed) then its compute
    (no overlap; `predict_step` models the prefetch pipeline). See `predict_parts`."""
    compute_s, load_s = predict_parts(cost, device, streamed=streamed, warm=warm, dtype=dtype,
                                      kv_on_disk=kv_on_disk)
    return compute_s + load_s


@dataclasses.dataclass(frozen=True)
class StepPrediction:
    """A step's predicted time. `per_group_s[i]`: wall time from the end of group i-1 to the end
    of group i (its compute plus any wait for its weights); `compute_s` and `load_s`: the sums
    of the units' compute and load times (overlapped or not); `io_wait_s` = total - compute."""

    total_s: float
    per_group_s: list[float]
    compute_s: float
    load_s: float

    @property
    def io_wait_s(self) -> float:
        return max(0.0, self.total_s - self.compute_s)


def contended(device: Device) -> Device:
    """The device as a streamed plan with a prefetch thread sees it: page-cache copies and
    weight streaming slowed by the fractions calibrated while both run at once."""
    return dataclasses.replace(
        device,
        storage_warm_bytes_per_s=device.storage_warm_bytes_per_s * device.copy_contended_fraction,
        matvec_bytes_per_s=device.weight_read_bytes_per_s * device.matvec_contended_fraction)


def predict_step(group_costs: Sequence[Cost], streamed: Sequence[bool], device: Device, *,
                 prefetch_depth: int, warm: bool = True, dtype: str = "float32",
                 kv_on_disk: bool = False, steps: int = 3, share_reads: bool = True) -> StepPrediction:
    """Predicted decode step of a plan, with the prefetcher's overlap of loads and compute.

    The model is an event simulation of `stagejax.store.Prefetcher` feeding the executor:
      * compute is sequential: group i computes after group i-1, and — if it streams weights —
        after its unit's load has finished;
      * depth 0: no thread; a unit is read synchronously when its group is reached (load and
        compute serialise: the step is the sum of both);
      * depth >= 1: one loader thread reads units in order, back to back, at most `depth` units
        in flight (started, not yet handed to the executor): unit v's load starts when unit
        v-1's is done and unit v-depth has been handed over;
      * `share_reads` (the prefetcher's default): an executor that would wait for its unit
        reads the next unit nobody has started itself (its own, or one further ahead while the
        loader finishes its own), within the same depth;
      * with a warm page cache and a loader thread, copies and weight streaming run at the
        rates calibrated while both run at once (`contended`): on 2 cores they share the cores
        and the memory bus;
      * the loader cycles across steps (the next step's first units load during this step's
        last groups), so `steps` steps are simulated and the last one reported (steady state).
    Not modelled: cache effects of freshly copied weights, the coalescing of small units into
    one read, and per-group Python overhead beyond `device.call_overhead_s` per call.
    """
    if len(group_costs) != len(streamed):
        raise ValueError(f"{len(group_costs)} group costs but {len(streamed)} streamed flags")
    if prefetch_depth < 0:
        raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if warm and prefetch_depth and any(streamed):
        device = contended(device)
    parts = [predict_parts(c, device, streamed=s, warm=warm, dtype=dtype, kv_on_disk=kv_on_disk)
             for c, s in zip(group_costs, streamed)]
    compute = [p[0] for p in parts]
    load = [p[1] for p in parts]
    n = len(group_costs)
    if n == 0:
        return StepPrediction(0.0, [], 0.0, 0.0)
    unit_loads = [load[i] for i in range(n) if streamed[i]]

    load_end: dict[int, float] = {}  # per unit ordinal (across steps), once its load started
    handed: list[float] = []  # per unit ordinal: when its group started computing
    started = 0  # units whose load has started (by the loader or the executor)
    loader_free = 0.0  # when the loader thread finishes its current read

    def loader_until(limit: float) -> None:
        """Start the loader's reads that begin by `limit`."""
        nonlocal started, loader_free
        while started < len(handed) + prefetch_depth:
            v = started
            begin = max(loader_free, handed[v - prefetch_depth] if v >= prefetch_depth else 0.0)
            if begin > limit:
                return
            load_end[v] = loader_free = begin + unit_loads[v % len(unit_loads)]
            started += 1

    clock = 0.0  # end of the previous group's compute
    step_start = 0.0
    per_group: list[float] = []
    for _ in range(steps):
        step_start = clock
        per_group = []
        for i in range(n):
            start = clock
            if streamed[i]:
                u = len(handed)
                if prefetch_depth == 0:
                    start = clock + load[i]  # read synchronously, when the group is reached
                else:
                    while True:
                        loader_until(start)
                        if u < started and load_end[u] <= start:
                            break
                        if share_reads and started < len(handed) + prefetch_depth:
                            v = started  # nobody has started it: the executor reads it
                            load_end[v] = start = start + unit_loads[v % len(unit_loads)]
                            started += 1
                            continue
                        start = max(start, load_end[u] if u < started else loader_free)
                handed.append(start)
            end = start + compute[i]
            per_group.append(end - clock)
            clock = end
    return StepPrediction(total_s=clock - step_start, per_group_s=per_group,
                          compute_s=sum(compute), load_s=sum(load))


def costs_over_kv(config: ModelConfig, *, tokens: int, kv_lens: Sequence[int],
                  **kwargs) -> list[Cost]:
    """`model_step_cost` at each of `kv_lens` for passes of `tokens` tokens, computed from two
    evaluations: every field of a pass's cost is affine in kv_len (KV bytes and attention FLOPs
    grow linearly with the past, nothing else depends on it)."""
    kv_lens = list(kv_lens)
    if not kv_lens:
        return []
    phase = "decode" if tokens == 1 else "prefill"
    base = model_step_cost(config, phase=phase, tokens=tokens, kv_len=kv_lens[0], **kwargs)
    if len(kv_lens) == 1:
        return [base]
    step = model_step_cost(config, phase=phase, tokens=tokens, kv_len=kv_lens[0] + 1, **kwargs)
    names = [f.name for f in dataclasses.fields(Cost) if f.name != "n_calls"]
    slope = {n: getattr(step, n) - getattr(base, n) for n in names}
    return [base.replace(**{n: getattr(base, n) + (kv - kv_lens[0]) * slope[n] for n in names})
            for kv in kv_lens]


def generation_time(config: ModelConfig, device: Device, *, prompt_tokens: int, new_tokens: int,
                    weight_bits: float = 32, kv_bits: float = 32, act_bits: float = 32,
                    dtype: str = "float32", ffn_active_fraction: float = 1.0,
                    streamed: bool = False, warm: bool = True) -> dict[str, float]:
    """Predicted latency of a generation, the whole model one unit per pass:
    prefill(`prompt_tokens`) + `new_tokens` decode steps at contexts prompt_tokens, ...,
    prompt_tokens + new_tokens - 1 (each output token is charged one decode step; the
    prefill's own logits are not counted as a free first token). `streamed`: the weights are
    read from storage on every pass (no overlap).

    Returns {"prefill_s", "decode_s", "total_s"}.
    """
    if prompt_tokens < 1 or new_tokens < 0:
        raise ValueError(f"need prompt_tokens >= 1 and new_tokens >= 0, got {prompt_tokens}, "
                         f"{new_tokens}")
    kw = dict(weight_bits=weight_bits, kv_bits=kv_bits, act_bits=act_bits,
              ffn_active_fraction=ffn_active_fraction)
    prefill = model_step_cost(config, phase="prefill", tokens=prompt_tokens, kv_len=0, **kw)
    prefill_s = predict_time(prefill, device, streamed=streamed, warm=warm, dtype=dtype)
    decode_s = sum(predict_time(cost, device, streamed=streamed, warm=warm, dtype=dtype)
                   for cost in costs_over_kv(config, tokens=1, kv_lens=range(
                       prompt_tokens, prompt_tokens + new_tokens), **kw))
    return {"prefill_s": prefill_s, "decode_s": decode_s, "total_s": prefill_s + decode_s}
