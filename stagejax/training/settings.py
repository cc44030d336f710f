"""Typed settings of one training run: the dataclass schemas behind hydra's `conf_train/`.

Library code receives these dataclasses, never a DictConfig; `stagejax.training.run` registers
`TrainSettings` in hydra's ConfigStore and converts the composed config with
`OmegaConf.to_object`. Every value is checked in `__post_init__`, so a bad override fails before
any tokenizer is trained or any step compiled.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from stagejax.settings import PathSettings, TrackingSettings

# XLA's CPU backend vectorises 8 float32 lanes (AVX2): FFN widths rounded to a multiple of 8
# keep the matmuls free of remainder loops. Tests set 1 to keep prime-sized shapes.
DEFAULT_FFN_MULTIPLE = 8


def _check_positive(field: str, value):
    if value is None or value <= 0:
        raise ValueError(f"{field} must be a positive number, got {value!r}")


def _check_fraction(field: str, value, *, closed_right: bool = False):
    ok = 0 <= value <= 1 if closed_right else 0 <= value < 1
    if not ok:
        bound = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{field} must be in {bound}, got {value!r}")


@dataclasses.dataclass
class ArchSettings:
    """A Llama-family architecture point of the sweep (the vocabulary comes from the tokenizer,
    the context length from `data.seq_len`); with `qk_norm` the Qwen3 family's layer. With `n_experts` > 1 every FFN is a mixture of
    `n_experts` SwiGLU experts, `top_k` routed per token, each of width ffn_ratio / top_k x
    d_model: `ffn_ratio` is the paper's r, the FFN ratio summed over the active experts."""

    name: str = "q04"
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: Optional[int] = None  # None: d_model // n_heads
    ffn_ratio: float = 8 / 3  # ffn_dim / d_model (SwiGLU's 2/3 of 4x keeps FFN params at 8 d^2)
    ffn_multiple: int = DEFAULT_FFN_MULTIPLE
    tie_embeddings: bool = True  # the LM head reuses the embedding, as in SmolLM2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    n_experts: int = 1
    top_k: int = 1  # experts per token
    load_balance_coef: float = 0.01  # weight of the load-balancing loss (Switch's 1e-2)
    qk_norm: bool = False  # an RMSNorm over each query and key head (the Qwen3 family's layer)

    def __post_init__(self):
        for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_ratio", "ffn_multiple",
                      "n_experts", "top_k"):
            _check_positive(f"model.{field}", getattr(self, field))
        if self.head_dim is not None:
            _check_positive("model.head_dim", self.head_dim)
        elif self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) is not a multiple of model.n_heads "
                             f"({self.n_heads}); set model.head_dim explicitly")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must be a multiple of "
                             f"model.n_kv_heads ({self.n_kv_heads})")
        if self.top_k > self.n_experts:
            raise ValueError(f"model.top_k ({self.top_k}) exceeds model.n_experts ({self.n_experts})")
        if self.load_balance_coef < 0:
            raise ValueError(f"model.load_balance_coef must be >= 0, got {self.load_balance_coef}")
        if self.resolved_head_dim % 2:
            raise ValueError(f"RoPE needs an even head dimension, got {self.resolved_head_dim} "
                             "(model.head_dim or d_model // n_heads)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Columns of one expert's FFN (the whole FFN's when dense)."""
        m = self.ffn_multiple
        return max(m, int(round(self.ffn_ratio / self.top_k * self.d_model / m)) * m)


@dataclasses.dataclass
class TokenizerSettings:
    vocab_size: int = 4096  # small, so the embedding does not swamp the smallest models
    min_frequency: int = 2  # a merge seen once is noise

    def __post_init__(self):
        if self.vocab_size < 257:
            raise ValueError(f"tokenizer.vocab_size must be > 256 (the byte alphabet plus at "
                             f"least one merge), got {self.vocab_size}")
        if self.vocab_size > 65535:
            raise ValueError(f"tokenizer.vocab_size must be <= 65535 (token ids are cached as "
                             f"uint16), got {self.vocab_size}")
        _check_positive("tokenizer.min_frequency", self.min_frequency)


@dataclasses.dataclass
class DataSettings:
    corpus: str = "pydocs"  # directory under paths.data holding {train,valid,test}.txt
    seq_len: int = 128
    batch_size: int = 16

    def __post_init__(self):
        _check_positive("data.seq_len", self.seq_len)
        _check_positive("data.batch_size", self.batch_size)
        if self.seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {self.seq_len}")


@dataclasses.dataclass
class OptimSettings:
    """AdamW with linear warmup then cosine decay (optax)."""

    lr: float = 3e-3
    warmup_frac: float = 0.1  # of the total steps
    min_lr_frac: float = 0.1  # the cosine ends at lr * min_lr_frac
    weight_decay: float = 0.1  # on matrices only; norm scales are not decayed
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables clipping

    def __post_init__(self):
        _check_positive("optim.lr", self.lr)
        _check_fraction("optim.warmup_frac", self.warmup_frac)
        _check_fraction("optim.min_lr_frac", self.min_lr_frac, closed_right=True)
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        for field in ("b1", "b2"):
            _check_fraction(f"optim.{field}", getattr(self, field))
        _check_positive("optim.eps", self.eps)
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


@dataclasses.dataclass
class BudgetSettings:
    tokens: int = 300_000  # the token budget D; steps = ceil(D / (batch_size * seq_len))
    log_every: int = 10  # steps between history rows
    progress: bool = True  # tqdm bar

    def __post_init__(self):
        _check_positive("train.tokens", self.tokens)
        _check_positive("train.log_every", self.log_every)


@dataclasses.dataclass
class EvalSettings:
    every: int = 0  # steps between validation evaluations during training; 0: only at the end
    during_tokens: int = 16_384  # tokens of valid scored at each evaluation during training
    max_tokens: Optional[int] = None  # tokens scored per split at the end; None: whole split

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0 (0: only at the end), got {self.every}")
        _check_positive("eval.during_tokens", self.during_tokens)
        if self.max_tokens is not None:
            _check_positive("eval.max_tokens", self.max_tokens)


@dataclasses.dataclass
class CheckpointSettings:
    every: int = 0  # steps between checkpoints; 0: only at the end
    keep: int = 1  # checkpoints kept on disk
    resume: bool = True  # continue from the run directory's latest checkpoint if there is one

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"checkpoint.every must be >= 0 (0: only at the end), got {self.every}")
        _check_positive("checkpoint.keep", self.keep)


@dataclasses.dataclass
class TrainSettings:
    model: ArchSettings = dataclasses.field(default_factory=ArchSettings)
    tokenizer: TokenizerSettings = dataclasses.field(default_factory=TokenizerSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    optim: OptimSettings = dataclasses.field(default_factory=OptimSettings)
    train: BudgetSettings = dataclasses.field(default_factory=BudgetSettings)
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    paths: PathSettings = dataclasses.field(default_factory=PathSettings)
    tracking: TrackingSettings = dataclasses.field(
        default_factory=lambda: TrackingSettings(project="stagejax-scaling"))
    seed: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
