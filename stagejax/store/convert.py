"""Converting a model to an orbax stage-shard checkpoint (design §4), cached by content.

A checkpoint lives at `${paths.cache}/checkpoints/<model>-<quant>-<hash>`; the hash covers the
source's sha256, the conversion parameters and the format version, so converting the same
inputs again finds it instead of writing it again. It is written to a temporary directory beside
it and renamed on success, one process at a time; a failed, interrupted or killed conversion
leaves nothing behind (`stagejax.store.checkpoints` says how), and an unusable checkpoint
(another format version, a corrupt manifest, a missing array file) is converted again.

The arrays are saved by orbax without OCDBT, as zarr v2 without compression: each array is one
directory holding one raw, C-order chunk file, which `WeightStore` reads directly. After saving,
every chunk file is read back, compared byte for byte with the array that was meant to be saved,
and checksummed into the manifest. Plain orbax restores the directory:
`ocp.PyTreeCheckpointer().restore(path)` gives the nested dict of numpy arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from stagejax import quant as quantization
from stagejax.loading import ModelHandle, open_model
from stagejax.model_config import ModelConfig
from stagejax.settings import ModelSettings, PathSettings, QuantSettings
from stagejax.store import checkpoints
from stagejax.store.layout import (QUANT_SCHEMES, ffn_chunk_bounds, flatten, nest,
                                   normalize_vocab_chunk, shard_arrays, stored_arrays,
                                   vocab_chunk_bounds)
from stagejax_device.manifest import (DEFAULT_CHECKSUM, FORMAT_VERSION, TOKENIZER_FILE,
                                     ArrayInfo, CheckpointError, Manifest, checksum_function)
from stagejax_device.paths import default_cache_dir

# Checksum granularity. 64 KiB: a one-row embedding read verifies ~28 SmolLM2 rows (~10 µs of
# crc32, ~3 µs of xxh3), while a 3.5 MB FFN matrix needs only 54 checksums.
DEFAULT_CHECKSUM_BLOCK_BYTES = 64 * 1024
HASH_CHARS = 16  # of the sha256 hex digest in the directory name: 64 bits, no accidental clashes

log = logging.getLogger(__name__)


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser().resolve()


def conversion_params(config: ModelConfig, ffn_chunks: int = 1, vocab_chunk: int | None = None,
                      quant: str = "none",
                      checksum_block_bytes: int = DEFAULT_CHECKSUM_BLOCK_BYTES,
                      checksum: str = DEFAULT_CHECKSUM) -> dict:
    """The parameters that define a checkpoint's contents, validated and in canonical form."""
    checksum_function(checksum)  # known and importable
    if quant not in QUANT_SCHEMES:
        raise ValueError(f"quant={quant!r} is not one of: {', '.join(QUANT_SCHEMES)}")
    if not isinstance(ffn_chunks, int) or not 1 <= ffn_chunks <= config.ffn_dim:
        raise ValueError(f"ffn_chunks must be an int in [1, {config.ffn_dim}], got {ffn_chunks!r}")
    # Group sizes must divide every weight's input dimension (design §6): refused here, before
    # anything is read. gguf_native's blocks are checked when the FFN is cut (their types are
    # only known from the file).
    quantization.check_scheme(quant, config, ffn_chunk_bounds(config.ffn_dim, ffn_chunks))
    if checksum_block_bytes <= 0:
        raise ValueError(f"checksum_block_bytes must be positive, got {checksum_block_bytes}")
    return {"ffn_chunks": int(ffn_chunks),
            "vocab_chunk": normalize_vocab_chunk(config.vocab_size, vocab_chunk),
            "quant": quant, "dtype": "float32", "checksum": checksum,
            "checksum_block_bytes": int(checksum_block_bytes)}


def checkpoint_hash(source_sha256: str, conversion: dict) -> str:
    key = json.dumps({"format_version": FORMAT_VERSION, "source_sha256": source_sha256,
                      "conversion": conversion}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:HASH_CHARS]


def check_source(handle: ModelHandle, quant: str) -> None:
    """Refuse a scheme the model's source cannot give: gguf_native needs a GGUF file."""
    if quant == "gguf_native" and handle.source_format != "gguf":
        raise quantization.QuantError(
            f"quant=gguf_native keeps a GGUF file's own quantized blocks, but model "
            f"{handle.name!r} comes from {handle.source_format!r} weights"
            f"{' (' + handle.source_path + ')' if handle.source_path else ''}; use quant=none, "
            "int8, int4_g32, int4_g64 or int4_g32_asym, or give a GGUF file (model.path=...)")


class _Source:
    """The model's weights and their identity, each computed at most once."""

    def __init__(self, handle: ModelHandle):
        self.handle = handle
        self._params = None
        self._identity = None

    def params(self) -> dict:
        """The float32 parameters, flat."""
        if self._params is None:
            self._params = flatten(self.handle.load_params())
            self._params = {k: np.asarray(v) for k, v in self._params.items()}
        return self._params

    def stored_params(self, quant: str) -> dict:
        """The parameters as `quant` stores them (nested; matrices may be `QuantizedMatrix`)."""
        if quant == "gguf_native":
            check_source(self.handle, quant)
            return quantization.gguf_native_params(self.handle.source_path, self.handle.config)
        return quantization.quantize_params(nest(self.params()), quant)

    def identity(self) -> dict:
        """format, path and sha256 of the source (random: of the generated parameters)."""
        if self._identity is None:
            h = self.handle
            if h.source_format == "random":
                sha = _params_sha256(self.params())
            elif h.source_path and Path(h.source_path).is_dir():
                sha = _dir_sha256(Path(h.source_path))
            elif h.source_path:
                sha = _file_sha256(Path(h.source_path))
            else:
                raise ValueError(f"model {h.name!r} has no source file to convert")
            self._identity = {"format": h.source_format, "path": h.source_path, "sha256": sha}
        return self._identity


def _file_sha256(path: Path, digest=None) -> str:
    digest = digest or hashlib.sha256()
    buffer = bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _dir_sha256(path: Path) -> str:
    """A Hugging Face directory: every regular file's name and content, in name order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest.update(file.name.encode() + b"\0")
        _file_sha256(file, digest)
    return digest.hexdigest()


def _params_sha256(flat: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(flat):
        a = np.ascontiguousarray(flat[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape}\0".encode())
        digest.update(a.view(np.uint8).reshape(-1))
    return digest.hexdigest()


def checkpoint_path(handle: ModelHandle, cache_dir: str | os.PathLike | None = None,
                    ffn_chunks: int = 1, vocab_chunk: int | None = None, quant: str = "none",
                    checksum_block_bytes: int = DEFAULT_CHECKSUM_BLOCK_BYTES,
                    checksum: str = DEFAULT_CHECKSUM) -> Path:
    """Where `convert_checkpoint` with these arguments puts (or finds) the checkpoint.

    Hashes the source file (a random preset: generates its parameters) but converts nothing.
    """
    conversion = conversion_params(handle.config, ffn_chunks, vocab_chunk, quant,
                                   checksum_block_bytes, checksum)
    check_source(handle, quant)
    return _final_path(handle, _Source(handle).identity(), conversion, cache_dir)


def _final_path(handle: ModelHandle, identity: dict, conversion: dict, cache_dir) -> Path:
    name = f"{handle.name}-{conversion['quant']}-{checkpoint_hash(identity['sha256'], conversion)}"
    return resolve_cache_dir(cache_dir) / "checkpoints" / name


def find_checkpoint(handle: ModelHandle, cache_dir: str | os.PathLike | None = None,
                    ffn_chunks: int = 1, vocab_chunk: int | None = None, quant: str = "none",
                    checksum_block_bytes: int = DEFAULT_CHECKSUM_BLOCK_BYTES,
                    checksum: str = DEFAULT_CHECKSUM) -> Path | None:
    """The usable cached checkpoint `convert_checkpoint` would return without converting
    (same arguments), or None if it would have to convert."""
    conversion = conversion_params(handle.config, ffn_chunks, vocab_chunk, quant,
                                   checksum_block_bytes, checksum)
    final = _final_path(handle, _Source(handle).identity(), conversion, cache_dir)
    if final.is_dir() and checkpoints.problem(final, handle.config, handle.name) is None:
        return final
    return None


def convert_checkpoint(handle: ModelHandle, cache_dir: str | os.PathLike | None = None,
                       ffn_chunks: int = 1, vocab_chunk: int | None = None, quant: str = "none",
                       progress: bool = True,
                       checksum_block_bytes: int = DEFAULT_CHECKSUM_BLOCK_BYTES,
                       checksum: str = DEFAULT_CHECKSUM) -> Path:
    """Convert `handle`'s weights to a stage-shard checkpoint, or find the cached one.

    A cached checkpoint is used when its manifest is readable, of this format version and
    model, and every array file is there at its size (`checkpoints.problem`); otherwise it is
    converted again and replaced. One process converts a checkpoint at a time (others wait
    for it, then use its result); the work happens in a temporary directory that is removed
    however the conversion ends (`stagejax.store.checkpoints`).

    Args:
      handle: from `stagejax.loading.open_model` (GGUF, HF directory or random preset).
      cache_dir: `paths.cache`; None: `$STAGEJAX_CACHE` or `~/.cache/stagejax`.
      ffn_chunks: FFN chunks per layer (`np.array_split` of the intermediate dimension).
      vocab_chunk: rows per vocabulary chunk of the embedding / LM head; None or 0: one chunk.
      quant: storage scheme, one of `stagejax.quant.SCHEMES` ("none": float32; see
        `stagejax.quant` for the others and their stored arrays).
      progress: show a tqdm progress bar.
      checksum_block_bytes: bytes per checksum block (rounded to whole rows of axis 0).
      checksum: "xxh3_64" (fast; needs xxhash) or "crc32" (zlib).
    Returns:
      The checkpoint directory (orbax-restorable, with `manifest.json` and `tokenizer.json`).
    Raises:
      CacheDirError: `paths.cache` cannot be written (read-only, not a directory, full).
    """
    conversion = conversion_params(handle.config, ffn_chunks, vocab_chunk, quant,
                                   checksum_block_bytes, checksum)
    check_source(handle, quant)
    source = _Source(handle)
    final = _final_path(handle, source.identity(), conversion, cache_dir)
    if final.is_dir() and checkpoints.problem(final, handle.config, handle.name) is None:
        return final
    cache = resolve_cache_dir(cache_dir)
    directory = checkpoints.make_dir(final.parent, cache)
    lock = checkpoints.CheckpointLock(directory, final.name)
    staging = None
    try:
        lock.acquire(on_wait=lambda holder: log.warning(
            "waiting for %s, which is converting %s", holder, final.name))
        checkpoints.remove_stale(directory, own=final.name)
        if final.is_dir():  # converted meanwhile by the process we waited for, or unusable
            reason = checkpoints.problem(final, handle.config, handle.name)
            if reason is None:
                return final
            log.warning("%s is unusable (%s): converting it again", final, reason)
        stored = source.stored_params(quant)
        checkpoints.check_free_space(directory, _stored_bytes(stored), cache)
        staging = checkpoints.Staging(directory, final.name, lock)
        with staging:
            staged = staging.root / "checkpoint"
            write_checkpoint(staged, handle.name, handle.config, handle.tokenizer, stored,
                             source.identity(), conversion, progress, run_save=staging.run_writer)
            if final.exists():  # the unusable one: into the temporary, removed with it
                os.rename(final, staging.root / "replaced")
            os.rename(staged, final)
    except (OSError, ValueError) as error:
        friendly = checkpoints.cache_dir_error(cache, error, f"write the checkpoint {final.name}")
        if friendly is None:
            raise
        raise friendly from error
    finally:
        if staging is None:
            lock.release()
    return final


def _stored_bytes(params: dict) -> int:
    """Bytes a checkpoint of these (stored-form) parameters writes, metadata included."""
    nested = any(isinstance(v, dict) for v in params.values())
    leaves = list((flatten(params) if nested else params).values())
    data = sum(v.nbytes if isinstance(v, quantization.QuantizedMatrix) else int(np.asarray(v).nbytes)
               for v in leaves)
    return data + len(leaves) * checkpoints.PER_ARRAY_OVERHEAD_BYTES


def write_checkpoint(directory: Path, model_name: str, config: ModelConfig, tokenizer,
                     params: dict, source: dict, conversion: dict,
                     progress: bool = True,
                     run_save: Callable[[Callable[[], None]], None] | None = None) -> Manifest:
    """Write the checkpoint into `directory` (which must not exist). `params`: flat or nested,
    float32 or already quantized as `conversion["quant"]` stores it (`_Source.stored_params`).
    `run_save(save)` runs orbax's save (default: `save()`); `convert_checkpoint` passes
    `Staging.run_writer`, so an interrupt during the save returns at once."""
    with _quiet_absl():  # orbax logs its handler registry when imported
        import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    start_s = time.perf_counter()
    if any(isinstance(v, dict) for v in params.values()):
        params = flatten(params)
    nested_params = nest(params)
    ffn_bounds = ffn_chunk_bounds(config.ffn_dim, conversion["ffn_chunks"])
    vocab_bounds = vocab_chunk_bounds(config.vocab_size, conversion["vocab_chunk"])
    total_bytes = sum(v.nbytes if isinstance(v, quantization.QuantizedMatrix)
                      else int(np.asarray(v).nbytes) for v in params.values())
    bar = tqdm(total=3 * total_bytes, unit="B", unit_scale=True, disable=not progress,
               desc=f"convert {model_name}: split")
    stored: dict[str, np.ndarray] = {}
    for key, value in shard_arrays(nested_params, config, ffn_bounds, vocab_bounds):
        arrays = stored_arrays(key, value)
        stored.update(arrays)
        bar.update(sum(a.nbytes for a in arrays.values()))

    bar.set_description(f"convert {model_name}: orbax save")
    def save():
        with _quiet_absl():
            # No OCDBT, no compression, zarr v2: one raw C-order chunk file per array, read
            # directly.
            handler = ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=False,
                                                  use_compression=False)
            ocp.Checkpointer(handler).save(directory.absolute(), nest(stored))

    (run_save or (lambda f: f()))(save)
    os.sync()  # durable before the rename, and clean pages so drop_page_cache can drop them
    bar.update(total_bytes)

    bar.set_description(f"convert {model_name}: checksum")
    arrays = {}
    for key, value in stored.items():
        arrays[key] = _describe_stored(directory, key, value, conversion["checksum_block_bytes"],
                                       checksum_function(conversion["checksum"]))
        bar.update(value.nbytes)
    bar.close()

    tokenizer_info = None  # a GGUF file may come without a vocabulary
    if tokenizer is not None:
        tokenizer_text = tokenizer.backend.to_str()
        (directory / TOKENIZER_FILE).write_text(tokenizer_text)
        tokenizer_info = {"file": TOKENIZER_FILE,
                          "sha256": hashlib.sha256(tokenizer_text.encode()).hexdigest(),
                          "bos_token_id": tokenizer.bos_token_id,
                          "eos_token_id": tokenizer.eos_token_id,
                          "add_bos": tokenizer.add_bos, "chat_template": tokenizer.chat_template}
    manifest = Manifest(
        format_version=FORMAT_VERSION, model_name=model_name, config=config.to_dict(),
        conversion=conversion, arrays=arrays, ffn_chunk_bounds=ffn_bounds,
        vocab_chunk_bounds=vocab_bounds, source=source, tokenizer_info=tokenizer_info,
        extra={"orbax_checkpoint_version": ocp.__version__,
               "created_unix_s": time.time(),
               "convert_s": round(time.perf_counter() - start_s, 3)},
        path=directory)
    manifest.write(directory)
    return manifest


@contextlib.contextmanager
def _quiet_absl():
    """orbax logs its save path through absl: ~50 INFO lines per save under hydra's logging,
    a WARNING about OCDBT merges we do not use, and one ERROR traceback per writer thread when
    a write fails (the failure itself reaches the caller as an exception)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def array_dir(key: str) -> str:
    """orbax's directory of the array at `key` (without OCDBT): the path joined by '.'."""
    return key.replace("/", ".")


def _describe_stored(directory: Path, key: str, value: np.ndarray, block_bytes: int,
                     checksum) -> ArrayInfo:
    """Check the array's zarr layout is one raw chunk equal to `value`; checksum it."""
    zarr_dir = directory / array_dir(key)
    try:
        zarray = json.loads((zarr_dir / ".zarray").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"orbax wrote no array {key!r} (no {zarr_dir / '.zarray'})") from None
    expected = {"zarr_format": 2, "compressor": None, "filters": None, "order": "C",
                "dtype": value.dtype.str, "shape": list(value.shape), "chunks": list(value.shape)}
    found = {k: zarray.get(k) for k in expected}
    if found != expected:
        raise CheckpointError(f"array {key!r}: orbax wrote {found}, not the single raw chunk "
                              f"{expected} that direct reads need ({zarr_dir / '.zarray'})")
    separator = zarray.get("dimension_separator", ".")
    file = zarr_dir / (separator.join("0" * max(1, value.ndim)))
    raw = np.fromfile(file, dtype=np.uint8)
    if raw.nbytes != value.nbytes or not np.array_equal(raw, value.view(np.uint8).reshape(-1)):
        raise CheckpointError(f"array {key!r}: {file} does not hold the array's bytes "
                              f"({raw.nbytes} bytes on disk, {value.nbytes} expected)")
    row_bytes = value.nbytes // value.shape[0] if value.ndim else value.nbytes
    block_rows = max(1, block_bytes // max(1, row_bytes))
    return ArrayInfo(key=key, shape=tuple(value.shape), dtype=value.dtype.name,
                     nbytes=int(value.nbytes), file=str(file.relative_to(directory)),
                     block_rows=block_rows,
                     checksums=tuple(block_checksums(raw, block_rows * row_bytes, checksum)))


def block_checksums(data: np.ndarray | memoryview, block_bytes: int, checksum) -> list[int]:
    view = memoryview(data).cast("B")
    return [checksum(view[start:start + block_bytes])
            for start in range(0, max(1, len(view)), block_bytes)]


@dataclasses.dataclass
class ConvertSettings:
    """`python -m stagejax.convert` (conf/convert.yaml): the model, its chunking, the cache."""

    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    quant: QuantSettings = dataclasses.field(default_factory=QuantSettings)
    paths: PathSettings = dataclasses.field(default_factory=PathSettings)
    ffn_chunks: int = 1
    vocab_chunk: Optional[int] = None  # rows per vocab chunk; None or 0: the whole vocabulary
    seed: int = 0  # random presets only
    checksum: str = "xxh3_64"  # or "crc32"
    progress: bool = True

    def __post_init__(self):
        if self.ffn_chunks < 1:
            raise ValueError(f"ffn_chunks must be >= 1, got {self.ffn_chunks}")
        if self.vocab_chunk is not None and self.vocab_chunk < 0:
            raise ValueError(f"vocab_chunk must be >= 0 or null, got {self.vocab_chunk}")
        if self.quant.scheme not in QUANT_SCHEMES:
            raise ValueError(f"quant.scheme={self.quant.scheme!r} is not one of: "
                             f"{', '.join(QUANT_SCHEMES)}")


def convert_from_settings(settings: ConvertSettings) -> Path:
    """Open the model and convert it (or find the cached checkpoint)."""
    handle = open_model(settings.model.name, settings.model.path, settings.seed)
    return convert_checkpoint(handle, settings.paths.cache, settings.ffn_chunks,
                              settings.vocab_chunk, settings.quant.scheme, settings.progress,
                              checksum=settings.checksum)
