"""What distinguishes one model family from another, as data (gemma's flags-configured block).

A `Family` is a handful of architectural switches — the norm, whether projections carry
biases, rotary or learned positions, the FFN's form. The Flax modules (`models.decoder`), the
stage shards (`store.layout`), the stages (`stagejax.stages`) and the cost model
(`stagejax.stage_kinds`) read these switches; none of them names a family. Each family is
declared in its own module (`models/llama.py`, `models/gpt2.py`, `models/qwen3.py`) together
with the checks its configs must pass and, for a family that is Llama's layer plus extra
tensors, how its Hugging Face and GGUF files name them (`ImportNames`); adding a family is
adding such a module and its line in `_MODULES` (docs/extending.md walks through Qwen3's).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

# family name -> the module declaring its `FAMILY`
_MODULES = {"llama": "stagejax.models.llama", "gpt2": "stagejax.models.gpt2",
            "qwen3": "stagejax.models.qwen3"}


@dataclasses.dataclass(frozen=True)
class ImportNames:
    """How a family laid out like Llama names its files' extra tensors (the importers read the
    shared Llama tensors themselves).

    hf_model_type: `model_type` in a Hugging Face config.json.
    gguf_architecture: `general.architecture` in a GGUF file.
    hf_layer_tensors / gguf_layer_tensors: per-layer tensor name (after `model.layers.{i}.` /
      `blk.{i}.`) -> (module, leaf) under the layer's parameters, each a vector of head_dim.
    gguf_rope_permuted: llama.cpp permuted the q/k rows for interleaved RoPE (its `llama`
      architecture); False where its converter keeps Hugging Face's rotate-half order (NeoX).
    """

    hf_model_type: str
    gguf_architecture: str
    hf_layer_tensors: dict = dataclasses.field(default_factory=dict)
    gguf_layer_tensors: dict = dataclasses.field(default_factory=dict)
    gguf_rope_permuted: bool = True


@dataclasses.dataclass(frozen=True)
class Family:
    """The switches of one family.

    norm: "rms" (RMSNorm, a scale) or "layer" (LayerNorm, scale and bias).
    biases: the q/k/v/o projections, the FFN's up and down projections and the norms have biases.
    rope: rotary positions applied to queries and keys; otherwise learned position rows are
      added to the token embedding (a `pos_embed` table of `max_seq_len` rows).
    ffn: "swiglu" (gate, up, down) or "gelu_mlp" (up, GELU, down).
    qk_norm: an RMSNorm over each query and key head (a scale of head_dim), before RoPE.
    check: raises ValueError for a config this family cannot run (e.g. GQA in GPT-2).
    names: how its files name its tensors, for a family read like Llama (None: the importers
      know the family by its own code, as Llama and GPT-2).
    """

    name: str
    norm: str
    biases: bool
    rope: bool
    ffn: str
    qk_norm: bool = False
    check: Callable = lambda config: None
    names: ImportNames | None = None

    def __post_init__(self):
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"Family.norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.ffn not in ("swiglu", "gelu_mlp"):
            raise ValueError(f"Family.ffn must be 'swiglu' or 'gelu_mlp', got {self.ffn!r}")

    @property
    def learned_positions(self) -> bool:
        return not self.rope

    @property
    def gated_ffn(self) -> bool:
        return self.ffn == "swiglu"

    @property
    def embed_rows_per_token(self) -> int:
        """Rows an embedding stage reads per token: its token's, and its position's if learned."""
        return 2 if self.learned_positions else 1


def family_names() -> tuple[str, ...]:
    return tuple(_MODULES)


def families() -> tuple[Family, ...]:
    return tuple(get_family(name) for name in _MODULES)


def llama_like_families() -> dict[str, Family]:
    """{Hugging Face model_type: family} of the families the importers read as Llama plus
    the extra tensors their `names` declare."""
    return {f.names.hf_model_type: f for f in families() if f.names is not None}


def get_family(name: str) -> Family:
    """The family called `name`, or a ValueError listing the known ones."""
    if name not in _MODULES:
        raise ValueError(f"unknown model family {name!r}; known families: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).FAMILY
