"""FLOPs, bytes and parameters of dense and mixture-of-experts decoders, counted two ways.

Owns the bookkeeping of the co-design paper (arXiv 2602.10377, App. E: Eq. 3-4, 16, 24-26, 29,
37, 42) for Llama-family architectures with E experts per layer of which K are active per token
(top-K routing), each expert a SwiGLU of intermediate size r_single · d. In the paper's symbols:
ρ = K / E, r = K · r_single (the FFN ratio summed over the active experts). Storage counts all
E experts; FLOPs and decode bytes the K active ones.

Two accountings (`ACCOUNTINGS`), selectable everywhere:

  * "paper" — what the paper counts (App. E): the Q, K, V and O projections, attention (QKᵀ,
    softmax at 5 FLOPs per score, score·V, each reading its K or V rows), and the SwiGLU
    gate / up / down of the active experts. No embeddings, LM head, norms, RoPE or router, and
    no activation traffic (the paper defines b_a but transcribes no activation counts). Prefill
    attention is the full S × S square (the paper's 2·B·S²·d), and prefill reads the active
    experts' weights only.
  * "full" — the project's accounting, `stagejax.roofline.model_step_cost`: the above plus the
    token embedding row, the tied LM head (last token's logits), RMSNorms, RoPE, elementwise
    work, activation reads and writes, causal attention (token t attends t keys), the experts a
    prefill of T tokens touches (1 − (1 − ρ)^T of them under uniform routing), and — added here,
    since model_step_cost has no router — a router per layer (d × E weights, 2·d·E FLOPs and a
    softmax / top-K of 5 FLOPs per expert score per token) when E > 1.

Counts are kept in elements (weights, KV entries, activation entries) so one count serves every
precision: bytes = elements × bytes per element of the `Precision`.

Time is the paper's per-operator roofline (Eq. 3-4): each operator of a pass takes
max(FLOPs / π_H, bytes / β_H); a pass is the sum over its operators; a generation is the prefill
of S_in tokens plus one decode step per output token over caches of S_in + 1, …, S_in + S_out
(Eq. 16: T_total = l·T_pre(S_in) + Σ_s l·T_dec(S_in + s)). No call overheads: the paper has none.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from stagejax.model_config import ModelConfig
from stagejax.op_cost import SOFTMAX_FLOPS_PER_SCORE, Cost
from stagejax.roofline import Device, model_step_cost

ACCOUNTINGS = ("paper", "full")
# Qwen2.5's tokenizer (its public config: vocab_size 151936): the full accounting's default
# vocabulary, so that designs and the Fig. 8 reference (Qwen2.5-0.5B) pay for the same head.
QWEN2_5_VOCAB = 151_936


@dataclasses.dataclass(frozen=True)
class Precision:
    """Bytes per weight / activation / KV element (the paper's b_w, b_a, b_kv) and the compute
    dtype whose peak (`Device.flops_per_s[compute_dtype]`) is π_H."""

    name: str
    compute_dtype: str
    weight_bytes: float
    act_bytes: float
    kv_bytes: float
    weight_format: str  # the quantization format whose measured loss cost applies (quant_loss)


# The paper states FP16 and INT8 without byte counts; 2 and 1 bytes per element of everything.
FP16 = Precision("fp16", "float16", 2.0, 2.0, 2.0, weight_format="float16")
INT8 = Precision("int8", "int8", 1.0, 1.0, 1.0, weight_format="int8")
PRECISIONS = {p.name: p for p in (FP16, INT8)}


@dataclasses.dataclass(frozen=True)
class MoEArchitecture:
    """A Llama-family decoder with E experts per layer, K active (dense: E = K = 1).

    `expert_ffn_ratio` is r_single (each expert's intermediate size / d); the paper's r is
    `ffn_ratio` = K · r_single and its ρ is `expert_ratio` = K / E.
    """

    depth: int
    width: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    expert_ffn_ratio: float
    n_experts: int = 1
    top_k: int = 1
    vocab: int = QWEN2_5_VOCAB
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("depth", "width", "n_heads", "n_kv_heads", "head_dim", "n_experts", "top_k",
                     "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MoEArchitecture.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"MoEArchitecture: n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEArchitecture: top_k ({self.top_k}) exceeds n_experts "
                             f"({self.n_experts})")
        if self.expert_ffn_ratio <= 0:
            raise ValueError(f"MoEArchitecture.expert_ffn_ratio must be positive, got "
                             f"{self.expert_ffn_ratio}")

    @classmethod
    def from_paper(cls, depth: int, width: int, ffn_ratio: float, n_experts: int, top_k: int,
                   n_kv_heads: int, head_dim: int = 64, **kwargs) -> "MoEArchitecture":
        """From the paper's parameters: r (active FFN ratio) and (E, K); n_heads = d / d_h."""
        if width % head_dim:
            raise ValueError(f"width {width} is not a multiple of head_dim {head_dim}")
        return cls(depth, width, width // head_dim, n_kv_heads, head_dim, ffn_ratio / top_k,
                   n_experts, top_k, **kwargs)

    @property
    def expert_ratio(self) -> float:  # ρ
        return self.top_k / self.n_experts

    @property
    def ffn_ratio(self) -> float:  # r
        return self.top_k * self.expert_ffn_ratio

    @property
    def gqa(self) -> float:
        return self.n_heads / self.n_kv_heads

    @property
    def q_width(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:  # d_m
        return self.n_kv_heads * self.head_dim

    @property
    def expert_ffn_dim(self) -> int:
        return max(1, round(self.expert_ffn_ratio * self.width))

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    def model_config(self, max_seq_len: int = 4096) -> ModelConfig:
        """The project's config of this design with all experts side by side (ffn_dim = E times
        the expert's), as the full accounting counts it."""
        return ModelConfig(family="llama", vocab_size=self.vocab, d_model=self.width,
                           n_layers=self.depth, n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                           head_dim=self.head_dim, ffn_dim=self.n_experts * self.expert_ffn_dim,
                           max_seq_len=max_seq_len, norm_eps=1e-6,
                           tie_embeddings=self.tie_embeddings)

    def label(self) -> str:
        experts = f" E{self.n_experts}K{self.top_k}" if self.is_moe else ""
        return (f"L{self.depth} d{self.width} r{self.ffn_ratio:g}{experts} "
                f"h{self.n_heads}/kv{self.n_kv_heads}")


def _check_accounting(accounting: str) -> None:
    if accounting not in ACCOUNTINGS:
        raise ValueError(f"accounting must be one of {ACCOUNTINGS}, got {accounting!r}")


# ---- parameters --------------------------------------------------------------------------------


def layer_params(arch: MoEArchitecture, accounting: str, *, active: bool) -> float:
    """Weights of one layer: all experts (`active=False`, storage) or the K active ones.

    paper: 2·d·(n_h·d_h) + 2·d·d_m + 3·r_single·d²·(E or K) (Eq. 24-26 before dividing by d²);
    full: the stored integer expert width, plus two RMSNorm scales and the router (d·E).
    """
    _check_accounting(accounting)
    d = arch.width
    attention = 2 * d * arch.q_width + 2 * d * arch.kv_width
    experts = arch.top_k if active else arch.n_experts
    if accounting == "paper":
        return attention + 3 * arch.expert_ffn_ratio * d * d * experts
    router = d * arch.n_experts if arch.is_moe else 0
    return attention + 3 * d * arch.expert_ffn_dim * experts + 2 * d + router


def model_params(arch: MoEArchitecture, accounting: str, *, active: bool = False) -> float:
    """Weights of the model: layers, plus (full accounting) the final norm, the embedding table
    and an untied LM head."""
    layers = arch.depth * layer_params(arch, accounting, active=active)
    if accounting == "paper":
        return layers
    head = 0 if arch.tie_embeddings else arch.vocab * arch.width
    return layers + arch.width + arch.vocab * arch.width + head


def memory_bytes(arch: MoEArchitecture, precision: Precision, accounting: str, *,
                 context_tokens: int) -> float:
    """Bytes a device must hold. paper: the stored weights (Eq. 42, weights only); full: all
    weights plus the KV cache at `context_tokens`."""
    weights = model_params(arch, accounting) * precision.weight_bytes
    if accounting == "paper":
        return weights
    return weights + 2 * arch.depth * arch.kv_width * context_tokens * precision.kv_bytes


# ---- per-operator counts -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OperatorCounts:
    """Per-operator counts of passes of the whole model, in elements.

    Arrays are [n_ops] for one pass or [n_ops, n_passes] for several (decode steps).
    `kv` counts KV entries read and written; `activations` activation entries moved.
    """

    names: tuple[str, ...]
    flops: np.ndarray
    weights: np.ndarray
    kv: np.ndarray
    activations: np.ndarray

    def bytes(self, precision: Precision) -> np.ndarray:
        return (self.weights * precision.weight_bytes + self.kv * precision.kv_bytes
                + self.activations * precision.act_bytes)

    def total(self, field: str) -> np.ndarray:
        """A field summed over the operators (per pass)."""
        return getattr(self, field).sum(axis=0)


def _paper_counts(arch: MoEArchitecture, tokens: int, attended) -> OperatorCounts:
    """The paper's per-operator counts (App. E) for passes of `tokens` tokens, each attending
    `attended` keys (prefill: the whole S × S square, attended = S; decode: tokens = 1 over a
    cache of S). `attended` may be an array (one pass per entry)."""
    a = np.atleast_1d(np.asarray(attended, dtype=np.float64))
    t, d, l = float(tokens), float(arch.width), float(arch.depth)
    qw, kw, r = float(arch.q_width), float(arch.kv_width), arch.ffn_ratio
    ones = np.ones_like(a)
    rows = {
        # name: (FLOPs, weight elements, KV elements) per layer
        "q": (2 * t * d * qw * ones, d * qw * ones, 0 * ones),
        "k": (2 * t * d * kw * ones, d * kw * ones, 0 * ones),
        "v": (2 * t * d * kw * ones, d * kw * ones, 0 * ones),
        "qk": (2 * t * a * qw, 0 * ones, a * kw),
        "softmax": (SOFTMAX_FLOPS_PER_SCORE * arch.n_heads * t * a, 0 * ones, 0 * ones),
        "sv": (2 * t * a * qw, 0 * ones, a * kw),
        "o": (2 * t * qw * d * ones, qw * d * ones, 0 * ones),
        "gate": (2 * t * r * d * d * ones, r * d * d * ones, 0 * ones),
        "up": (2 * t * r * d * d * ones, r * d * d * ones, 0 * ones),
        "down": (2 * t * r * d * d * ones, r * d * d * ones, 0 * ones),
    }
    names = tuple(rows)

    def whole_model(field: int) -> np.ndarray:  # [n_ops, n_passes], all l layers
        return l * np.stack([rows[n][field] for n in names])

    return OperatorCounts(names, whole_model(0), whole_model(1), whole_model(2),
                          np.zeros((len(names), a.size)))


def _router_cost(arch: MoEArchitecture, tokens: int) -> Cost:
    if not arch.is_moe:
        return Cost()
    d, e, t = arch.width, arch.n_experts, tokens
    return Cost(flops=arch.depth * t * e * (2 * d + SOFTMAX_FLOPS_PER_SCORE),
                weight_bytes=arch.depth * d * e, act_read_bytes=arch.depth * t * d,
                act_write_bytes=arch.depth * t * e, weight_params=arch.depth * d * e)


def _full_parts(arch: MoEArchitecture, config: ModelConfig, *, tokens: int, kv_len: int) -> dict[str, Cost]:
    # All bit widths 8: bytes = elements, so one count serves every precision.
    _, parts = model_step_cost(config, phase="prefill" if tokens > 1 else "decode", tokens=tokens,
                               kv_len=kv_len, weight_bits=8, kv_bits=8, act_bits=8, vector_bits=8,
                               ffn_active_fraction=arch.expert_ratio, breakdown=True)
    parts = dict(parts)
    if arch.is_moe:
        parts["router"] = _router_cost(arch, tokens)
    return parts


def _counts_from_parts(parts_per_pass: list[dict[str, Cost]]) -> OperatorCounts:
    names = tuple(parts_per_pass[0])

    def field(getter):
        return np.array([[getter(p[n]) for p in parts_per_pass] for n in names])

    return OperatorCounts(
        names, field(lambda c: c.flops), field(lambda c: c.weight_bytes),
        field(lambda c: c.kv_bytes + c.kv_write_bytes),
        field(lambda c: c.act_read_bytes + c.act_write_bytes))


def prefill_counts(arch: MoEArchitecture, accounting: str, prompt_tokens: int) -> OperatorCounts:
    """Counts of the prefill of `prompt_tokens` tokens (B = 1), one pass: arrays [n_ops, 1]."""
    _check_accounting(accounting)
    if accounting == "paper":
        return _paper_counts(arch, prompt_tokens, prompt_tokens)
    config = arch.model_config(max(4096, prompt_tokens + 1))
    return _counts_from_parts([_full_parts(arch, config, tokens=prompt_tokens, kv_len=0)])


def decode_counts(arch: MoEArchitecture, accounting: str, prompt_tokens: int,
                  new_tokens: int) -> OperatorCounts:
    """Counts of the `new_tokens` decode steps over caches of S_in + 1, …, S_in + S_out keys
    (the paper's Eq. 16; in the full accounting step s has S_in + s − 1 cached tokens and
    attends them and itself): arrays [n_ops, new_tokens]."""
    _check_accounting(accounting)
    caches = prompt_tokens + np.arange(1, new_tokens + 1)
    if accounting == "paper":
        return _paper_counts(arch, 1, caches)
    config = arch.model_config(max(4096, prompt_tokens + new_tokens + 1))
    # Every field is affine in the cache length (roofline.costs_over_kv): two evaluations.
    first = _full_parts(arch, config, tokens=1, kv_len=prompt_tokens)
    second = _full_parts(arch, config, tokens=1, kv_len=prompt_tokens + 1)
    base, slope = _counts_from_parts([first]), _counts_from_parts([second])
    steps = np.arange(new_tokens)[None, :]

    def affine(field):
        b = getattr(base, field)
        return b + (getattr(slope, field) - b) * steps

    return OperatorCounts(base.names, affine("flops"), affine("weights"), affine("kv"),
                          affine("activations"))


# ---- time ----------------------------------------------------------------------------------------


def pass_times_s(counts: OperatorCounts, device: Device, precision: Precision) -> np.ndarray:
    """Seconds of each pass: Σ over operators of max(FLOPs / π_H, bytes / β_H) (Eq. 3-4)."""
    compute_s = counts.flops / device.peak_flops(precision.compute_dtype)
    memory_s = counts.bytes(precision) / device.mem_read_bytes_per_s
    return np.maximum(compute_s, memory_s).sum(axis=0)


@dataclasses.dataclass(frozen=True)
class GenerationCounts:
    """The counts a generation needs, computed once per design and accounting."""

    prefill: OperatorCounts
    decode: OperatorCounts

    def latency_s(self, device: Device, precision: Precision) -> dict[str, float]:
        prefill_s = float(pass_times_s(self.prefill, device, precision).sum())
        decode_s = float(pass_times_s(self.decode, device, precision).sum())
        return {"prefill_s": prefill_s, "decode_s": decode_s, "total_s": prefill_s + decode_s}


def generation_counts(arch: MoEArchitecture, accounting: str, *, prompt_tokens: int = 1024,
                      new_tokens: int = 16) -> GenerationCounts:
    return GenerationCounts(prefill_counts(arch, accounting, prompt_tokens),
                            decode_counts(arch, accounting, prompt_tokens, new_tokens))


def generation_latency(arch: MoEArchitecture, device: Device, precision: Precision, *,
                       accounting: str = "paper", prompt_tokens: int = 1024,
                       new_tokens: int = 16) -> dict[str, float]:
    """{"prefill_s", "decode_s", "total_s"} of a batch-1 generation under `accounting`."""
    return generation_counts(arch, accounting, prompt_tokens=prompt_tokens,
                             new_tokens=new_tokens).latency_s(device, precision)


# ---- the per-layer coefficients of Table 4, from the counts ---------------------------------------


def layer_coefficients(arch: MoEArchitecture, accounting: str, precision: Precision, *,
                       prompt_tokens: int = 1024, new_tokens: int = 16) -> dict[str, float]:
    """The paper's per-layer constraint coefficients as the accounting counts them, divided by
    l·d² (and b_w for bytes), so they compare with the closed forms of Eq. 24-26:

      xi_F     prefill FLOPs per prompt token                 (closed form 4 + 4/gqa + 6r)
      xi_W_dec weight bytes of one decode step / b_w          (2 + 2/gqa + 3r)
      Gamma    mean bytes of a decode step / b_w              (ξ_W^dec + 2·S̄·b_kv/(gqa·d·b_w))
      xi_W_all stored weight bytes / b_w                      (2 + 2/gqa + 3r/ρ)

    In the full accounting these include the parts that are not per layer (embedding row, LM
    head, final norm) spread over the layers, as the whole-model constraints see them.
    """
    scale = arch.depth * arch.width ** 2
    pre = prefill_counts(arch, accounting, prompt_tokens)
    dec = decode_counts(arch, accounting, prompt_tokens, new_tokens)
    return {
        "xi_F": float(pre.total("flops").sum()) / (scale * prompt_tokens),
        "xi_W_dec": float(dec.total("weights").mean()) / scale,
        "Gamma": float(dec.bytes(precision).sum(axis=0).mean()) / (scale * precision.weight_bytes),
        "xi_W_all": model_params(arch, accounting) / scale,
    }

