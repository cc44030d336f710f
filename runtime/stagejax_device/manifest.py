"""The manifest of a stage-shard checkpoint (`manifest.json` beside the orbax arrays, design §4).

It says what the checkpoint is (format version, model, config, source file and its sha256,
tokenizer, conversion parameters) and, per array, where its bytes are and how to verify them:
key, shape, dtype, bytes, the raw zarr chunk file holding it, and one checksum per block of
rows (`block_rows` rows of axis 0 each, at most `checksum_block_bytes` bytes unless one row is
larger), so a partial read such as one embedding row can be verified without reading the rest.

The checksum algorithm is a conversion parameter: "xxh3_64" (default; the `xxhash` package,
~25-33 GB/s here) or zlib's "crc32" (~6.6 GB/s; adler32 was slower still, ~3.9 GB/s). With
verify="read" the checksum runs on every byte streamed, so its speed matters: see
docs/weight_store.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Callable


# Bump when the layout, the manifest or the meaning of a field changes; readers refuse others.
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_CHECKSUM = "xxh3_64"
CHECKPOINTS = "checkpoints"  # the directory of `paths.cache` that holds converted checkpoints


def checksum_function(name: str) -> Callable[[memoryview], int]:
    """The checksum called `name`: a function of a buffer returning an int."""
    if name == "crc32":
        return zlib.crc32
    if name == "xxh3_64":
        try:
            import xxhash
        except ImportError:
            raise CheckpointError("checksum 'xxh3_64' needs the xxhash package (pip install "
                                  "xxhash), or convert with checksum='crc32'") from None
        return xxhash.xxh3_64_intdigest
    raise ValueError(f"unknown checksum {name!r}; known: crc32, xxh3_64")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, truncated, or not the one expected.

    The message names the array and the file where one is at fault.
    """


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """One stored array.

    Attributes:
      key: '/'-separated stage key, e.g. "L3/q/5/w".
      shape, dtype: numpy shape and dtype name ("float32").
      nbytes: bytes of the array (= size of its chunk file: one uncompressed C-order chunk).
      file: path of the raw zarr chunk file, relative to the checkpoint directory.
      block_rows: rows of axis 0 per checksum block (1-D arrays: elements).
      checksums: checksum of each block of the file, in order (algorithm in the conversion).
    """

    key: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    file: str
    block_rows: int
    checksums: tuple[int, ...]

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes

    @property
    def block_bytes(self) -> int:
        return self.block_rows * self.row_bytes

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "nbytes": self.nbytes,
                "file": self.file, "block_rows": self.block_rows, "checksums": list(self.checksums)}

    @classmethod
    def from_json(cls, key: str, data: dict) -> "ArrayInfo":
        return cls(key, tuple(data["shape"]), data["dtype"], int(data["nbytes"]), data["file"],
                   int(data["block_rows"]), tuple(int(c) for c in data["checksums"]))


@dataclasses.dataclass
class Manifest:
    """What a checkpoint holds. `arrays` is in stage order (see `stagejax.store.layout`)."""

    format_version: int
    model_name: str
    config: dict  # the model's architecture (stagejax.model_config.ModelConfig.to_dict())
    conversion: dict  # ffn_chunks, vocab_chunk, quant, dtype, checksum, checksum_block_bytes
    arrays: dict[str, ArrayInfo]
    ffn_chunk_bounds: list[int]
    vocab_chunk_bounds: list[int]
    source: dict  # format, path, sha256 (random: the sha256 of the generated parameters)
    tokenizer_info: dict | None  # file, sha256, bos/eos ids, add_bos, chat_template
    extra: dict = dataclasses.field(default_factory=dict)  # versions, timings
    path: Path | None = None  # the checkpoint directory it was read from

    @property
    def keys(self) -> list[str]:
        return list(self.arrays)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.arrays.values())

    def tokenizer_file(self) -> Path:
        """The checkpoint's `tokenizer.json` (with `tokenizer_info`'s ids and chat template)."""
        if self.path is None:
            raise ValueError("this manifest was not read from a checkpoint directory")
        if self.tokenizer_info is None:
            raise CheckpointError(f"{self.path}: the model was converted without a tokenizer "
                                  "(its source had none)")
        return self.path / self.tokenizer_info["file"]

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "model_name": self.model_name,
            "config": self.config,
            "conversion": self.conversion,
            "ffn_chunk_bounds": self.ffn_chunk_bounds,
            "vocab_chunk_bounds": self.vocab_chunk_bounds,
            "source": self.source,
            "tokenizer": self.tokenizer_info,
            "extra": self.extra,
            "arrays": {key: info.to_json() for key, info in self.arrays.items()},
        }

    def write(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_FILE
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "Manifest":
        """The manifest of the checkpoint at `directory`; refuses another format version."""
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such checkpoint directory")
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{directory}: not a stagejax stage-shard checkpoint "
                                  f"({MANIFEST_FILE} is missing)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: corrupt manifest ({e})") from e
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{directory}: checkpoint format version {version!r}, but this stagejax reads "
                f"version {FORMAT_VERSION}")
        try:
            return cls(
                format_version=version,
                model_name=data["model_name"],
                config=dict(data["config"]),
                conversion=data["conversion"],
                arrays={key: ArrayInfo.from_json(key, info)
                        for key, info in data["arrays"].items()},
                ffn_chunk_bounds=list(data["ffn_chunk_bounds"]),
                vocab_chunk_bounds=list(data["vocab_chunk_bounds"]),
                source=data["source"],
                tokenizer_info=data["tokenizer"],
                extra=data.get("extra", {}),
                path=directory,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from e

    def check_matches(self, config=None, model_name: str | None = None) -> None:
        """Refuse a checkpoint of another model, naming the fields that differ. `config`: the
        expected architecture, a dict or an object with `to_dict()` (a ModelConfig)."""
        where = self.path or "checkpoint"
        if model_name is not None and model_name != self.model_name:
            raise CheckpointError(f"{where}: checkpoint of model {self.model_name!r}, "
                                  f"expected {model_name!r}")
        theirs = config.to_dict() if hasattr(config, "to_dict") else config
        if theirs is not None and theirs != self.config:
            ours = self.config
            diff = ", ".join(f"{k}={ours[k]!r} (expected {theirs[k]!r})"
                             for k in ours if ours[k] != theirs[k])
            raise CheckpointError(f"{where}: checkpoint of another model "
                                  f"({self.model_name!r}): {diff}")


def convert_command(manifest: Manifest, cache_dir: Path | None) -> str:
    """The `python -m stagejax.convert` command that writes this checkpoint."""
    conversion = manifest.conversion
    args = [f"model={manifest.model_name}", f"quant={conversion['quant']}",
            f"ffn_chunks={conversion['ffn_chunks']}",
            f"vocab_chunk={conversion['vocab_chunk'] or 'null'}",
            f"checksum={conversion['checksum']}"]
    if manifest.source.get("format") == "hf" and manifest.source.get("path"):
        args.append(f"model.path={manifest.source['path']}")
    if cache_dir is not None:
        args.append(f"paths.cache={cache_dir}")
    return "python -m stagejax.convert " + " ".join(args)


def remedy(path: Path) -> str:
    """What to do about the unusable checkpoint at `path`: remove it, then convert again —
    with the exact command when its manifest can still be read."""
    cache_dir = path.parent.parent if path.parent.name == CHECKPOINTS else None
    clean = f"python -m stagejax.cache clean {path}"
    try:
        manifest = Manifest.read(path)
    except CheckpointError:
        return (f"remove it ({clean}); the next run converts the model again (or: python -m "
                "stagejax.convert with the run's model, quant and chunking)")
    return f"replace it: {clean} && {convert_command(manifest, cache_dir)}"
