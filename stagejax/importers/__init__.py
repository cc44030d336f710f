"""Importers: model files of other formats in, (config, float32 params, tokenizer) out.

`ImportedModel.params` is a nested dict of float32 numpy arrays in the `Decoder` layout
(see `stagejax.models.decoder`), ready for `Decoder.apply` or for conversion to stage shards.
"""

from __future__ import annotations

import dataclasses

from stagejax.model_config import ModelConfig
from stagejax.tokenizer import Tokenizer


@dataclasses.dataclass
class ImportedModel:
    config: ModelConfig
    params: dict
    tokenizer: Tokenizer | None
    source_path: str
    source_format: str  # "gguf" | "hf"
    metadata: dict = dataclasses.field(default_factory=dict)  # format-specific facts worth keeping
