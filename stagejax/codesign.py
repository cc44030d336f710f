"""Roofline co-design: predicted latency and loss of candidate architectures, and their Pareto front.

Owns the architecture search, after arXiv 2602.10377 (design §1): for each
architecture of a grid, latency on a device comes from the roofline (`stagejax.roofline`: the
prefill of the prompt plus one decode step per output token, the whole model resident) and loss
from a pluggable scaling law (`stagejax.fitting`; default Chinchilla's published fit). The
Pareto-optimal designs (minimum latency and loss) are kept; `best_under` picks the lowest-loss
design within a latency and a memory budget.

Memory-scheduled decoding enters as a co-design dimension: `staged_plan` estimates, for a design
and a RAM budget, whether the model can stay resident or must stream its weights from storage
in units that fit the budget, and what that costs per token. It is an analytic stand-in for the
scheduler's exact dynamic programme over stage groupings; `search` takes the estimator as a
parameter (`grouping=`) so the exact one can replace it at this single call site.

Conventions (stated, because the result depends on them):
  * Architectures are Llama-family (RMSNorm, SwiGLU, GQA, RoPE), batch 1, tied embeddings.
  * `ffn_ratio` sets the total FFN width (all experts); a mixture of experts with activation
    rate f = `moe_active_fraction` reads and computes f of it per token (`roofline` scales
    the FFN analytically), while memory holds all of it.
  * Loss: the loss model is evaluated at N = total parameters including embeddings (Chinchilla's
    convention; `loss_params="non_embedding"` for a fit made on non-embedding N). For a MoE, N is
    the geometric mean of the active and total counts — a stated heuristic between the
    pessimistic (active) and optimistic (total) readings. Training tokens D = 20 N
    (Chinchilla-optimal) unless `training_tokens` is given.
  * Compute dtype: float32 for 32-bit weights, else `Workload.compute_dtype` (bfloat16): the
    weights are dequantised into it, so low-bit formats save bytes, not FLOPs.

The co-design paper's own search lives at the end: its Table 5 space of dense and
mixture-of-experts designs (`table5_space`, `MoEArchitecture` with E experts, K active), timed
with either accounting of `stagejax.moe_accounting` and scored with its loss law
(`stagejax.architecture_law`) plus the measured cost of the weight format (`stagejax.quant_loss`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Iterable, Sequence

from stagejax.architecture_law import PAPER_TABLE6, ArchitectureLaw
from stagejax.fitting import CHINCHILLA, LossModel
from stagejax.model_config import ModelConfig
from stagejax.moe_accounting import (ACCOUNTINGS, GenerationCounts, MoEArchitecture, Precision,
                                     generation_counts, memory_bytes as moe_memory_bytes)
from stagejax.quant_loss import QuantLossTable
from stagejax.roofline import Device, costs_over_kv, generation_time, predict_parts


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A Llama-family decoder design point."""

    depth: int
    width: int
    ffn_ratio: float
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    weight_bits: float
    moe_active_fraction: float = 1.0
    kv_bits: float = 16.0

    def __post_init__(self):
        for name in ("depth", "width", "n_heads", "n_kv_heads", "head_dim", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Architecture.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"Architecture: n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"Architecture: RoPE needs an even head_dim, got {self.head_dim}")
        if self.ffn_ratio <= 0 or self.weight_bits <= 0 or self.kv_bits <= 0:
            raise ValueError("Architecture: ffn_ratio, weight_bits and kv_bits must be positive")
        if not 0 < self.moe_active_fraction <= 1:
            raise ValueError(f"Architecture.moe_active_fraction must be in (0, 1], got "
                             f"{self.moe_active_fraction}")

    @property
    def ffn_dim(self) -> int:
        return max(1, round(self.ffn_ratio * self.width))

    def model_config(self, max_seq_len: int = 2048) -> ModelConfig:
        return ModelConfig(family="llama", vocab_size=self.vocab, d_model=self.width,
                           n_layers=self.depth, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           head_dim=self.head_dim, ffn_dim=self.ffn_dim, max_seq_len=max_seq_len,
                           norm_eps=1e-5, tie_embeddings=True)

    # Parameter counts (all experts). Per layer: q and o n_heads*head_dim*width each, k and v
    # n_kv_heads*head_dim*width each, SwiGLU 3*width*ffn_dim, two RMSNorm scales.
    def layer_params(self) -> tuple[int, int]:
        """(attention + norm parameters, FFN parameters) of one layer."""
        q_width, kv_width = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = 2 * q_width * self.width + 2 * kv_width * self.width + 2 * self.width
        return attention, 3 * self.width * self.ffn_dim

    @property
    def params_non_embedding(self) -> int:
        attention, ffn = self.layer_params()
        return self.depth * (attention + ffn) + self.width  # + the final norm

    @property
    def params_total(self) -> int:
        return self.params_non_embedding + self.vocab * self.width  # tied LM head

    @property
    def params_active(self) -> float:
        _, ffn = self.layer_params()
        return self.params_total - self.depth * ffn * (1 - self.moe_active_fraction)

    @property
    def weight_bytes(self) -> float:
        return self.params_total * self.weight_bits / 8

    def label(self) -> str:
        moe = f" moe{self.moe_active_fraction:g}" if self.moe_active_fraction < 1 else ""
        return (f"L{self.depth} d{self.width} r{self.ffn_ratio:g} h{self.n_heads}/kv{self.n_kv_heads}"
                f" w{self.weight_bits:g}b{moe}")


@dataclasses.dataclass(frozen=True)
class Workload:
    """What is timed: batch 1 (the only batch modelled), `prompt_tokens` in, `new_tokens` out."""

    prompt_tokens: int = 1024
    new_tokens: int = 16
    compute_dtype: str = "bfloat16"
    warm: bool = True  # streamed weights come from the page cache (else from storage)

    def __post_init__(self):
        if self.prompt_tokens < 1 or self.new_tokens < 1:
            raise ValueError(f"Workload needs prompt_tokens >= 1 and new_tokens >= 1, got "
                             f"{self.prompt_tokens}, {self.new_tokens}")

    @property
    def context(self) -> int:
        return self.prompt_tokens + self.new_tokens

    def dtype_for(self, arch: Architecture) -> str:
        return "float32" if arch.weight_bits >= 32 else self.compute_dtype


def kv_cache_bytes(arch: Architecture, tokens: int) -> float:
    return 2 * arch.depth * arch.n_kv_heads * arch.head_dim * tokens * arch.kv_bits / 8


def memory_bytes(arch: Architecture, workload: Workload = Workload()) -> float:
    """Resident footprint: all weights (every expert), the KV cache at the full context, and the
    largest activation of the prefill (float32 residual and FFN hidden of the prompt)."""
    activations = 4 * workload.prompt_tokens * (2 * arch.width + 2 * arch.ffn_dim)
    return arch.weight_bytes + kv_cache_bytes(arch, workload.context) + activations


def predict_latency(arch: Architecture, device: Device, workload: Workload = Workload()) -> dict:
    """Predicted generation latency, weights resident: {"prefill_s", "decode_s", "total_s"}.

    prefill(prompt_tokens) + one decode step per output token (contexts prompt_tokens, ...,
    context - 1), each `max(FLOPs / peak, bytes / bandwidth)` plus one call overhead (the
    whole model one unit per pass), from `stagejax.roofline.generation_time`.
    """
    return generation_time(arch.model_config(workload.context), device,
                           prompt_tokens=workload.prompt_tokens, new_tokens=workload.new_tokens,
                           weight_bits=arch.weight_bits, kv_bits=arch.kv_bits,
                           dtype=workload.dtype_for(arch),
                           ffn_active_fraction=arch.moe_active_fraction)


def predict_loss(arch: Architecture, loss_model: LossModel = CHINCHILLA, *,
                 training_tokens: float | None = None, tokens_per_param: float = 20.0,
                 loss_params: str = "total") -> float:
    """The loss model at this design's N (see the module docstring for the conventions)."""
    if loss_params == "total":
        total, active = arch.params_total, arch.params_active
    elif loss_params == "non_embedding":
        embedding = arch.vocab * arch.width
        total, active = arch.params_non_embedding, arch.params_active - embedding
    else:
        raise ValueError(f"loss_params must be 'total' or 'non_embedding', got {loss_params!r}")
    n = math.sqrt(total * active) if arch.moe_active_fraction < 1 else float(total)
    d = training_tokens if training_tokens is not None else tokens_per_param * n
    return float(loss_model(n, d))


# ---- staged decoding as a co-design dimension -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StagedPlan:
    """How a design runs under a RAM budget, estimated analytically (see `staged_plan`).

    mode: "resident" (everything fits: the `model` schedule), "streamed" (weights read from
    storage in `n_units` units per pass, each at most `unit_bytes`), or "infeasible" (even the
    largest atomic stage does not fit; `min_budget_bytes` says what would).
    """

    mode: str
    ram_budget_bytes: float
    peak_bytes: float
    min_budget_bytes: float
    n_units: int
    unit_bytes: float
    prefill_s: float
    decode_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s


def largest_atomic_stage_bytes(arch: Architecture) -> float:
    """The largest stage that cannot be cut further: the output projection (all heads, one
    stage in design §3); q/k/v heads are smaller, and FFN and vocabulary chunks can be cut down
    to one column / row."""
    return arch.n_heads * arch.head_dim * arch.width * arch.weight_bits / 8


def staged_plan(arch: Architecture, device: Device, ram_budget_bytes: float,
                workload: Workload = Workload(), *, prefetch_depth: int = 2, kv_block: int = 512,
                prefill_block: int = 64) -> StagedPlan:
    """Analytic estimate of the best stage grouping of `arch` under `ram_budget_bytes`.

    * Resident if `memory_bytes` fits the budget (latency as `predict_latency`).
    * Otherwise streamed, like the `budget` policy: the KV cache moves to storage (one block of
      `kv_block` rows of one layer resident) and the weights are packed into units of at most
      u = (budget - KV block - activations) / (prefetch_depth + 1) bytes (the prefetcher holds
      depth + 1 slabs), n = ceil(weights / u) units per pass. u must hold the largest atomic
      stage. Each decode step streams every weight once: load = weights / storage rate,
      overlapped with compute when prefetch_depth >= 1 (max of the two, else their sum), plus
      n call overheads and the KV read from the page cache; the prefill runs in passes of
      `prefill_block` tokens, each streaming the weights again. Weights stream at the warm
      (page-cache) rate only if `workload.warm` and the device's RAM can hold the whole weight
      file beside the budget; else at the cold storage rate.
    """
    if ram_budget_bytes <= 0:
        raise ValueError(f"ram_budget_bytes must be positive, got {ram_budget_bytes}")
    resident = memory_bytes(arch, workload)
    if resident <= ram_budget_bytes:
        latency = predict_latency(arch, device, workload)
        return StagedPlan("resident", ram_budget_bytes, resident, resident, 1, arch.weight_bytes,
                          latency["prefill_s"], latency["decode_s"])
    kv_block_bytes = 2 * arch.n_kv_heads * arch.head_dim * kv_block * arch.kv_bits / 8
    activations = 4 * prefill_block * (2 * arch.width + 2 * arch.ffn_dim)
    atomic = largest_atomic_stage_bytes(arch)
    min_budget = (prefetch_depth + 1) * atomic + kv_block_bytes + activations
    unit = (ram_budget_bytes - kv_block_bytes - activations) / (prefetch_depth + 1)
    if unit < atomic:
        return StagedPlan("infeasible", ram_budget_bytes, min_budget, min_budget, 0, atomic,
                          math.inf, math.inf)
    n_units = max(1, math.ceil(arch.weight_bytes / unit))
    unit = max(arch.weight_bytes / n_units, atomic)  # packed evenly
    config = arch.model_config(workload.context)
    dtype = workload.dtype_for(arch)
    # The page cache is RAM too: weights stream warm only if the device can cache the whole
    # file beside the process's budget; otherwise every pass reads them from storage.
    warm = workload.warm and arch.weight_bytes <= device.ram_bytes - ram_budget_bytes
    storage = device.storage_warm_bytes_per_s if warm else device.storage_read_bytes_per_s
    load_s = arch.weight_bytes / storage

    kw = dict(weight_bits=arch.weight_bits, kv_bits=arch.kv_bits,
              ffn_active_fraction=arch.moe_active_fraction)

    def pass_s(cost) -> float:
        compute_s, _ = predict_parts(cost.replace(n_calls=n_units), device, streamed=False,
                                     dtype=dtype, kv_on_disk=True)
        # MoE: only the experts a pass touches are read (roofline scales cost.weight_bytes).
        streamed_s = load_s * cost.weight_bytes / arch.weight_bytes
        return max(compute_s, streamed_s) if prefetch_depth else compute_s + streamed_s

    full, rest = divmod(workload.prompt_tokens, prefill_block)
    prefill_s = sum(map(pass_s, costs_over_kv(config, tokens=prefill_block, kv_lens=[
        b * prefill_block for b in range(full)], **kw)))
    if rest:
        prefill_s += pass_s(costs_over_kv(config, tokens=rest, kv_lens=[full * prefill_block], **kw)[0])
    decode_s = sum(map(pass_s, costs_over_kv(config, tokens=1, kv_lens=range(
        workload.prompt_tokens, workload.context), **kw)))
    peak = (prefetch_depth + 1) * unit + kv_block_bytes + activations
    return StagedPlan("streamed", ram_budget_bytes, peak, min_budget, n_units, unit, prefill_s,
                      decode_s)


# ---- the search --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DesignPoint:
    """One evaluated design: resident latency, predicted loss, footprint; `staged` under the
    search's RAM budget when one was given."""

    arch: Architecture
    latency_s: float
    prefill_s: float
    decode_s: float
    loss: float
    memory_bytes: float
    staged: StagedPlan | None = None

    @property
    def params_total(self) -> int:
        return self.arch.params_total

    @property
    def params_non_embedding(self) -> int:
        return self.arch.params_non_embedding


def architecture_grid(depths: Iterable[int] = (8, 12, 16, 24, 32),
                      widths: Iterable[int] = (512, 768, 1024, 1536, 2048),
                      ffn_ratios: Iterable[float] = (2.0, 8 / 3, 4.0),
                      kv_heads: Iterable[int] = (1, 2, 4),
                      weight_bits: Iterable[float] = (4.5, 8.0, 16.0),
                      moe_active_fractions: Iterable[float] = (1.0, 0.25),
                      head_dim: int = 64, vocab: int = 32000,
                      kv_bits: float = 16.0) -> list[Architecture]:
    """Every combination that is a valid architecture: n_heads = width / head_dim, and kv heads
    that divide it (others are skipped). Weight bits 4.5 = int4 with a float16 scale per 32."""
    grid = []
    for depth, width, r, kv, bits, moe in itertools.product(depths, widths, ffn_ratios, kv_heads,
                                                             weight_bits, moe_active_fractions):
        if width % head_dim:
            continue
        n_heads = width // head_dim
        if kv > n_heads or n_heads % kv:
            continue
        grid.append(Architecture(depth, width, r, n_heads, kv, head_dim, vocab, bits, moe, kv_bits))
    return grid


GroupingEstimator = Callable[..., StagedPlan]


def search(archs: Sequence[Architecture], device: Device, workload: Workload = Workload(), *,
           loss_model: LossModel = CHINCHILLA, training_tokens: float | None = None,
           tokens_per_param: float = 20.0, loss_params: str = "total",
           ram_budget_bytes: float | None = None,
           grouping: GroupingEstimator = staged_plan,
           loss_penalty: Callable[[Architecture], float] | None = None) -> list[DesignPoint]:
    """Evaluate every architecture on `device`: resident latency, loss, footprint, and — with a
    RAM budget — the stage grouping `grouping(arch, device, ram_budget_bytes, workload)`.

    `loss_penalty(arch)` is added to the predicted loss: scaling laws in N and D know nothing of
    quantization, so without one, fewer weight bits only ever win; pass a measured penalty
    (e.g. the perplexity cost of int4 on a reference model, as a loss difference) to trade
    them fairly."""
    points = []
    for arch in archs:
        latency = predict_latency(arch, device, workload)
        staged = grouping(arch, device, ram_budget_bytes, workload) if ram_budget_bytes else None
        points.append(DesignPoint(
            arch, latency["total_s"], latency["prefill_s"], latency["decode_s"],
            predict_loss(arch, loss_model, training_tokens=training_tokens,
                         tokens_per_param=tokens_per_param, loss_params=loss_params)
            + (loss_penalty(arch) if loss_penalty else 0.0),
            memory_bytes(arch, workload), staged))
    return points


def _objectives(point) -> tuple[float, float]:
    if isinstance(point, DesignPoint):
        return point.latency_s, point.loss
    if isinstance(point, tuple) and len(point) == 2:
        return point
    return point.latency_s, point.loss


def pareto_front(points: Sequence, key: Callable | None = None) -> list:
    """The points no other point dominates (<= in both latency and loss, < in one), sorted by
    latency. Points are `DesignPoint`s, (latency, loss) tuples, or anything `key` maps to a
    (latency, loss) pair. Of exact duplicates, the first is kept."""
    objective = key or _objectives
    ordered = sorted(points, key=lambda p: objective(p))  # by latency, then loss
    front, best_loss = [], math.inf
    for point in ordered:
        latency, loss = objective(point)
        if loss < best_loss:  # strictly better loss than every faster (or equally fast) point
            front.append(point)
            best_loss = loss
    return front


def best_under(front: Sequence[DesignPoint], latency_budget_s: float | None = None,
               memory_budget_bytes: float | None = None, *, staged: bool = False) -> DesignPoint | None:
    """The lowest-loss design within the budgets (None if none fits). `staged`: judge latency by
    the design's staged plan (memory is then the plan's peak, within its RAM budget)."""
    feasible = []
    for point in front:
        if staged:
            if point.staged is None:
                raise ValueError("best_under(staged=True) needs points searched with a RAM budget")
            latency, memory = point.staged.total_s, point.staged.peak_bytes
        else:
            latency, memory = point.latency_s, point.memory_bytes
        if latency_budget_s is not None and latency > latency_budget_s:
            continue
        if memory_budget_bytes is not None and memory > memory_budget_bytes:
            continue
        feasible.append(point)
    return min(feasible, key=lambda p: p.loss, default=None)


# ---- tables ------------------------------------------------------------------------------------


def design_row(point: DesignPoint, *, best: bool = False) -> dict:
    """One design as a flat row (units in the names) for CSV and markdown tables."""
    arch = point.arch
    row = {
        "design": arch.label(), "best": "*" if best else "", "depth": arch.depth,
        "width": arch.width, "ffn_ratio": round(arch.ffn_ratio, 3), "n_heads": arch.n_heads,
        "n_kv_heads": arch.n_kv_heads, "weight_bits": arch.weight_bits,
        "moe_active_fraction": arch.moe_active_fraction,
        "params_total_m": round(arch.params_total / 1e6, 1),
        "params_non_embedding_m": round(arch.params_non_embedding / 1e6, 1),
        "memory_mb": round(point.memory_bytes / 1e6, 1),
        "prefill_ms": round(point.prefill_s * 1e3, 2), "decode_ms": round(point.decode_s * 1e3, 2),
        "latency_ms": round(point.latency_s * 1e3, 2), "loss": round(point.loss, 4),
    }
    if point.staged is not None:
        s = point.staged
        row.update(staged_mode=s.mode, staged_units=s.n_units,
                   staged_peak_mb=round(s.peak_bytes / 1e6, 1),
                   staged_latency_ms=round(s.total_s * 1e3, 1) if math.isfinite(s.total_s) else "inf")
    return row


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of `rows` (dicts with the same keys)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---- the co-design paper's search space (arXiv 2602.10377 App. A, Table 5) -----------------------

TABLE5_DEPTHS = tuple(range(4, 33, 4))
TABLE5_WIDTHS = (768, 1024, 1280, 1536, 1792, 2048, 2304, 2560, 3072)
TABLE5_EXPERTS = ((1, 1), (8, 1), (8, 2), (16, 1), (16, 2))  # (E, K)
TABLE5_KV_HEADS = (1, 2, 4, 8, None)  # None: n_kv = n_h (no GQA)
# Table 5 gives no FFN-ratio grid (its findings report r below 1 on the fronts): the active
# ratio r = K·r_single is searched over this grid, from a quarter of d to 4 d.
R_GRID = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
# Not given by the paper either: d_h = 64 (Qwen2.5-0.5B's, the paper's Fig. 8 reference).
TABLE5_HEAD_DIM = 64


def table5_space(r_grid=R_GRID, *, head_dim: int = TABLE5_HEAD_DIM, depths=TABLE5_DEPTHS,
                 widths=TABLE5_WIDTHS, experts=TABLE5_EXPERTS, kv_heads=TABLE5_KV_HEADS,
                 **arch_kwargs) -> list[MoEArchitecture]:
    """Every valid design of Table 5 × `r_grid`: n_h = d / d_h; n_kv values that do not divide
    n_h are skipped (e.g. 8 kv heads at d = 768, 12 query heads), and n_kv = n_h only once."""
    space = []
    for depth, width, (n_experts, top_k), r in itertools.product(depths, widths, experts, r_grid):
        n_heads = width // head_dim
        for n_kv in sorted({n_heads if kv is None else kv for kv in kv_heads}):
            if n_kv > n_heads or n_heads % n_kv:
                continue
            space.append(MoEArchitecture.from_paper(depth, width, r, n_experts, top_k, n_kv,
                                                    head_dim, **arch_kwargs))
    return space


@dataclasses.dataclass(frozen=True)
class MoEDesignPoint:
    """One evaluated design of the paper's space on one device, precision and accounting."""

    arch: MoEArchitecture
    precision: str
    accounting: str
    prefill_s: float
    decode_s: float
    total_s: float
    loss: float  # the law's prediction plus the weight format's loss offset
    memory_bytes: float

    def latency(self, kind: str) -> float:
        return {"prefill": self.prefill_s, "decode": self.decode_s, "total": self.total_s}[kind]


def law_loss(arch: MoEArchitecture, law: ArchitectureLaw = PAPER_TABLE6) -> float:
    """The paper's law at a design: L(l, d, r = K·r_single, ρ = K/E, d_m = n_kv·d_h)."""
    return float(law(arch.depth, arch.width, arch.ffn_ratio, arch.expert_ratio, arch.kv_width))


def search_moe(archs: Sequence[MoEArchitecture], device: Device, precision: Precision, *,
               accounting: str = "paper", law: ArchitectureLaw = PAPER_TABLE6,
               quant_loss: QuantLossTable | None = None, prompt_tokens: int = 1024,
               new_tokens: int = 16, memory_budget_bytes: float | None = None,
               counts: dict | None = None) -> list[MoEDesignPoint]:
    """Evaluate designs of the paper's space: per-operator roofline latency under `accounting`,
    the law's loss plus ln(perplexity ratio) of the precision's weight format (`quant_loss`;
    None: no offset), and memory; designs whose memory exceeds `memory_budget_bytes` are left
    out. `counts` caches `generation_counts` per (arch, accounting) across calls."""
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")
    offset = quant_loss.loss_offset(precision.weight_format) if quant_loss is not None else 0.0
    context = prompt_tokens + new_tokens
    counts = {} if counts is None else counts
    points = []
    for arch in archs:
        memory = moe_memory_bytes(arch, precision, accounting, context_tokens=context)
        if memory_budget_bytes is not None and memory > memory_budget_bytes:
            continue
        key = (arch, accounting, prompt_tokens, new_tokens)
        if key not in counts:
            counts[key] = generation_counts(arch, accounting, prompt_tokens=prompt_tokens,
                                            new_tokens=new_tokens)
        generation: GenerationCounts = counts[key]
        latency = generation.latency_s(device, precision)
        points.append(MoEDesignPoint(arch, precision.name, accounting, latency["prefill_s"],
                                     latency["decode_s"], latency["total_s"],
                                     law_loss(arch, law) + offset, memory))
    return points


def moe_front(points: Sequence[MoEDesignPoint], kind: str = "total") -> list[MoEDesignPoint]:
    """The Pareto front (Eq. 6) of loss against the `kind` latency: prefill, decode or total."""
    if kind not in ("prefill", "decode", "total"):
        raise ValueError(f"kind must be prefill, decode or total, got {kind!r}")
    return pareto_front(points, key=lambda p: (p.latency(kind), p.loss))


def moe_design_row(point: MoEDesignPoint) -> dict:
    """A design as a flat row (units in the names)."""
    arch = point.arch
    return {"design": arch.label(), "precision": point.precision, "accounting": point.accounting,
            "depth": arch.depth, "width": arch.width, "ffn_ratio": round(arch.ffn_ratio, 4),
            "n_experts": arch.n_experts, "top_k": arch.top_k,
            "expert_ratio": round(arch.expert_ratio, 4), "n_heads": arch.n_heads,
            "n_kv_heads": arch.n_kv_heads, "moe": arch.is_moe,
            "prefill_ms": round(point.prefill_s * 1e3, 3), "decode_ms": round(point.decode_s * 1e3, 3),
            "total_ms": round(point.total_s * 1e3, 3), "loss": round(point.loss, 5),
            "memory_mb": round(point.memory_bytes / 1e6, 1)}
