"""Orbax stage shards (design §4): convert a model's weights, then stream them back.

    from stagejax.loading import open_model
    from stagejax.store import WeightStore, convert_checkpoint

    handle = open_model("smollm2_135m")
    path = convert_checkpoint(handle, ffn_chunks=2)        # cached: the second call is a lookup
    with WeightStore(path, expect_config=handle.config) as store:
        arrays = store.read(["L0/q/0/w", "L0/q/1/w"])      # 64-byte-aligned numpy, zero-copy to JAX
        ...
        store.release(arrays)

`layout` owns the keys and shapes, `manifest` the checkpoint's description, `convert` the
conversion and its cache, `weight_store` the reading. See docs/weight_store.md for measurements.
"""

from stagejax.store.convert import (ConvertSettings, checkpoint_path, convert_checkpoint,
                                    convert_from_settings, default_cache_dir, find_checkpoint)
from stagejax.store.layout import (QUANT_SCHEMES, assemble_params, ffn_chunk_bounds,
                                   shard_arrays, vocab_chunk_bounds)
from stagejax_device.manifest import FORMAT_VERSION, ArrayInfo, CheckpointError, Manifest
from stagejax_device.weight_store import VERIFY_MODES, Prefetcher, WeightStore, aligned_empty

__all__ = [
    "ArrayInfo", "CheckpointError", "ConvertSettings", "FORMAT_VERSION", "Manifest", "Prefetcher",
    "QUANT_SCHEMES", "VERIFY_MODES", "WeightStore", "aligned_empty", "assemble_params",
    "checkpoint_path", "convert_checkpoint", "convert_from_settings", "default_cache_dir",
    "find_checkpoint",
    "ffn_chunk_bounds", "shard_arrays", "vocab_chunk_bounds",
]
