"""FLOPs and bytes as numbers: the `Cost` of a stage, group or step, and the elementwise FLOP
counts behind it (the accounting conventions are `stagejax.roofline`'s docstring).

The stage kinds (`stagejax.stage_kinds`) declare their costs in these terms; the roofline adds
them up into groups and steps and turns them into time.
"""

from __future__ import annotations

import dataclasses
import math

# Elementwise FLOPs per element (why each number: the operations ops.py performs).
RMSNORM_FLOPS = 4  # square, sum, scale by 1/rms, scale by the weight
LAYERNORM_FLOPS = 7  # mean, subtract, square, sum, normalise, scale, shift
ROPE_FLOPS = 3  # x1 cos - x2 sin (and its mirror): two multiplies and one add per element
SWIGLU_ACT_FLOPS = 5  # silu(g) = g / (1 + exp(-g)): negate, exp, add, divide; times up
GELU_TANH_FLOPS = 8  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): cube, fma, tanh, add, muls
SOFTMAX_FLOPS_PER_SCORE = 5  # scale, running max, exp, sum, rescale of the online softmax
LOGSUMEXP_FLOPS = 4  # scoring mode: max, subtract, exp, sum per logit


@dataclasses.dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of a stage, group or step. `+` adds field by field.

    `weight_params` counts the weights read (parameters, not bytes) and `kv_write_bytes` the
    new cache rows written; both are additions to the roofline's fields.
    """

    flops: float = 0.0
    weight_bytes: float = 0.0
    kv_bytes: float = 0.0
    act_read_bytes: float = 0.0
    act_write_bytes: float = 0.0
    n_calls: int = 0
    kv_write_bytes: float = 0.0
    weight_params: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        if not isinstance(other, Cost):
            return NotImplemented
        return Cost(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                       for f in dataclasses.fields(Cost)})

    def __radd__(self, other):  # sum(costs) starts from 0
        if other == 0:
            return self
        return NotImplemented

    def replace(self, **changes) -> "Cost":
        return dataclasses.replace(self, **changes)

    @property
    def bytes_moved(self) -> float:
        """Every byte read or written: weights, KV read and written, activations."""
        return (self.weight_bytes + self.kv_bytes + self.kv_write_bytes + self.act_read_bytes
                + self.act_write_bytes)

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOPs per byte moved."""
        return self.flops / self.bytes_moved if self.bytes_moved else math.inf


@dataclasses.dataclass(frozen=True)
class Bits:
    """Bits per stored weight (matrices), vector (norm scales, biases), KV element, activation."""

    weight: float
    vector: float
    kv: float
    act: float

    def __post_init__(self):
        for name in ("weight", "vector", "kv", "act"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}_bits must be positive, got {getattr(self, name)}")
