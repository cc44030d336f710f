"""Loading a model by preset name or file, in two phases.

`open_model` reads only what describes the model (architecture, tokenizer); `load_params`
then reads the weights. Runs compile their executables between the two, so the runtime's own
memory (`baseline_rss_bytes`, design §7) is measured before any weight is resident.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stagejax.model_config import ModelConfig, get_preset
from stagejax.tokenizer import Tokenizer, byte_tokenizer


@dataclasses.dataclass
class ModelHandle:
    """A model whose description is known and whose weights are not loaded yet."""

    name: str
    config: ModelConfig
    tokenizer: Tokenizer
    source_format: str  # "gguf" | "hf" | "random"
    source_path: str | None
    _read_params: Callable[[], dict]
    _close: Callable[[], None] | None = None  # releases the source file once weights are read

    def load_params(self) -> dict:
        """The float32 parameters (Decoder layout) as JAX arrays.

        The importer's numpy copies are dropped and their memory handed back to the OS, so
        the resident set afterwards is the parameters themselves (what `model`'s decode peak
        is meant to show), not the parameters plus the import's leftovers.
        """
        imported = self._read_params()
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), imported)
        jax.block_until_ready(params)
        del imported
        if self._close is not None:
            self._close()
        release_freed_memory()
        return params

    def abstract_params(self) -> dict:
        """Shapes and dtypes of the parameters, without reading or allocating them."""
        from stagejax.models import init_params

        return jax.eval_shape(lambda: init_params(self.config))


@dataclasses.dataclass
class Model:
    """A model ready to run: architecture, parameters (Decoder layout) and tokenizer."""

    name: str
    config: ModelConfig
    params: dict
    tokenizer: Tokenizer
    source_format: str
    source_path: str | None = None

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(self.params))


def release_freed_memory() -> None:
    """Return freed heap memory to the OS.

    glibc raises its mmap threshold after large frees, so freed multi-MB numpy buffers stay on
    the heap and in RSS; malloc_trim gives them back.
    """
    gc.collect()
    return_free_heap()


def return_free_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim), wherever they lie.

    Buffers of a few MB that XLA and numpy free come back from the heap rather than their own
    mappings once glibc's sliding mmap threshold has risen, and freed pages between live ones
    stay resident: over the 32 passes of a 2,048-token window a tiny model's RSS grew 34 MB
    above its live memory, all of it returned by one trim. A no-op off glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def use_one_malloc_arena() -> None:
    """Make every thread allocate from glibc's main arena (mallopt M_ARENA_MAX = 1).

    Each thread otherwise gets an arena of its own whose touched pages stay resident: the
    prefetch thread's arena alone added 2-4 MB to a staged decode's RSS, more than its planned
    working set. Call before threads start; a no-op off glibc.
    """
    M_ARENA_MAX = -8  # from glibc's malloc.h
    _mallopt(M_ARENA_MAX, 1)


def _mallopt(option: int, value: int) -> None:
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(option, value)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library if it is glibc, loaded once: staged passes trim after every group, and
    each load makes a handful of objects in reference cycles."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def open_model(name: str = "smollm2_135m", path: str | None = None, seed: int = 0) -> ModelHandle:
    """Describe the preset `name` (`path` overrides its weight file or directory)."""
    preset = get_preset(name)
    source, path = preset.source, path or preset.path
    if path is not None and source == "random":
        source = "hf" if Path(path).is_dir() else "gguf"
    if source == "random":
        from stagejax.models import init_params

        config = preset.config
        return ModelHandle(name, config, byte_tokenizer(config.vocab_size, config.eos_token_id),
                           "random", None, lambda: init_params(config, seed))
    if source == "gguf":
        from stagejax.importers.gguf import GGUFFile, packaged_smollm2_gguf

        gguf_path = path or packaged_smollm2_gguf()
        # The reader's parsed metadata (~180 MB of Python objects for SmolLM2's vocabulary) is
        # not the runtime's cost: close it now and reopen the file to read the weights, so the
        # baseline measured in between is honest (reopening costs ~2 s).
        with GGUFFile(gguf_path) as gguf_file:
            config, tokenizer = gguf_file.config, gguf_file.tokenizer()

        def read_params():
            with GGUFFile(gguf_path) as weights_file:
                return weights_file.params()

        release_freed_memory()
        return ModelHandle(name, config, tokenizer, "gguf", str(gguf_path), read_params)
    from stagejax.importers.hf import read_hf_dir

    if path is None:
        raise ValueError(f"model preset {name!r} reads a Hugging Face directory: set model.path")
    # The description now, the weights when loaded: nothing here keeps them alive afterwards.
    described = read_hf_dir(path, with_params=False)
    tokenizer = described.tokenizer or byte_tokenizer(described.config.vocab_size,
                                                       described.config.eos_token_id)
    return ModelHandle(name, described.config, tokenizer, "hf", str(described.source_path),
                       lambda: read_hf_dir(path).params)


def load_model(name: str = "smollm2_135m", path: str | None = None, seed: int = 0) -> Model:
    """Open and load the preset `name` in one call (the Python API's entry point)."""
    handle = open_model(name, path, seed)
    return Model(name, handle.config, handle.load_params(), handle.tokenizer,
                 handle.source_format, handle.source_path)
