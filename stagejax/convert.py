"""`python -m stagejax.convert`: convert a model to an orbax stage-shard checkpoint (hydra entry).

    python -m stagejax.convert                                  # SmolLM2-135M, one FFN chunk
    python -m stagejax.convert model=tiny ffn_chunks=3 vocab_chunk=100 paths.cache=/tmp/c

Composes `conf/convert.yaml` over `stagejax.store.ConvertSettings` and calls
`stagejax.store.convert_from_settings`; prints the checkpoint directory. Converting the same
inputs again finds the cached checkpoint.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # MACHINE_NOTES: BLAS threads fight XLA's
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import hydra  # noqa: E402
from hydra.core.config_store import ConfigStore  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from stagejax.store.convert import ConvertSettings  # noqa: E402

ConfigStore.instance().store(name="convert_schema", node=ConvertSettings)


def to_settings(cfg: DictConfig) -> ConvertSettings:
    settings = OmegaConf.to_object(cfg)
    assert isinstance(settings, ConvertSettings), type(settings)
    return settings


@hydra.main(version_base="1.3", config_path="../conf", config_name="convert")
def main(cfg: DictConfig) -> str:
    from stagejax.store import Manifest, convert_from_settings

    path = convert_from_settings(to_settings(cfg))
    manifest = Manifest.read(path)
    print(f"{path}\n  {len(manifest.arrays)} arrays, {manifest.nbytes / 1e6:.1f} MB, "
          f"ffn chunks {manifest.ffn_chunk_bounds}, vocab chunks {manifest.vocab_chunk_bounds}")
    return str(path)


if __name__ == "__main__":
    main()
