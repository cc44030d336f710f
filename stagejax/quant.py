"""Weight quantization: the `quant/` schemes (design §6), stored as quantized bytes in the stage
shards and dequantized inside the jitted stages and the monolithic model.

This module owns the storage formats of a quantized matrix, the numpy quantizers conversion
uses, the exact un-packing of 4-bit values, and the jnp dequantization every consumer calls, so
the staged and monolithic paths turn the same stored bytes into the same float32 weights.

Schemes -> stored leaves of one matrix whose float leaf would be `w` (`gate`, `up`, `down`):

  none            `w`                     float32, as before (e.g. `L0/q/3/w` [D, H] = [in, out])
  int8            `w_i8`   int8 [out, in] + `w_scale` float32 [out]
                  symmetric per output channel: scale = max|w| / 127, w ~ scale * q
  int4_g32/_g64   `w_i4`   uint8 [in/2, out] + `w_scale` float16 [in/G, out]
                  symmetric per group of G consecutive inputs of one output: scale = max|w| / 7,
                  q in [-7, 7] stored as q + 8
  int4_g32_asym   `w_u4`   uint8 [in/2, out] + `w_scale` float16 [in/G, out]
                  + `w_zero` uint8 [in/G, out]: scale = (max - min) / 15 over the group with the
                  range widened to include 0, zero = round(-min / scale) in [0, 15],
                  w ~ scale * (q - zero)
  gguf_native     `w_q4_1`, `w_q8_0`, `w_q4_0`, `w_q5_0`, `w_q5_1`: the GGUF file's own blocks,
                  byte for byte (ggml-common.h layouts), uint8 [in/32 * block_bytes, out];
                  `w_f16` float16 [in, out] for F16 tensors; F32 / BF16 tensors stay float32 `w`

Orientation. A quantized matrix is stored input-major ([in..., out]: the output channel is the
fastest-varying axis), except int8, stored [out, in]. Measured on this CPU (1536x576 matvec,
see `experiments/bench_quant.py --matvec`, docs/quantization.md): XLA's dequantize-then-dot
vectorizes along the minor axis, so 4-bit nibbles and GGUF blocks unpack 2-4x faster when the
minor axis is the 1536-wide output than when it is a 16-byte run of one block; int8 is the
reverse (its [out, in] dot fuses the conversion). For gguf_native this means each output
channel's row of blocks becomes a column: every block keeps its bytes, in order.

Nibble order: within a group of G inputs, packed byte r holds input r in its low nibble and
input r + G/2 in its high nibble — GGUF's Q4 order — so one unpacking serves int4 and Q4/Q5.

Embedding rows (`embed/{c}/...`) are read one token at a time, so they are stored out-major
([V_c, ...]: the transpose of the input-major arrays). When the LM head is tied to the embedding
and the format is input-major, the checkpoint also holds `head/{c}/...`: the same quantized
values, input-major, for the head's matvec (design §4 says `head/{c}` is absent when tied; with
quantization it holds this copy — streamed bytes per token do not change, the embedding reads
only its rows).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SCHEMES = ("none", "int8", "int4_g32", "int4_g64", "int4_g32_asym", "gguf_native")

# scheme -> (format tag, group size) of the matrices it quantizes from float32
_REQUANTIZING = {"int8": ("i8", 0), "int4_g32": ("i4", 32), "int4_g64": ("i4", 64),
                 "int4_g32_asym": ("u4", 32)}

GGUF_BLOCK = 32  # values per block of every GGUF type kept natively (QK4_0 = QK8_0 = 32)
GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}
TAGS = ("i8", "i4", "u4", "f16") + tuple(GGUF_BLOCK_BYTES)
OUT_MAJOR_TAGS = ("i8",)
COMPANIONS = ("scale", "zero")


class QuantError(ValueError):
    """A weight or setting that a scheme cannot store; the message names it and what to do."""


def _xp(array):
    return np if isinstance(array, np.ndarray) else jnp


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """A matrix of logical shape [in_dim, out_dim] (y = x @ W) held as quantized arrays.

    `data`, `scale`, `zero` are numpy arrays (conversion) or JAX arrays (inside a jit); it is a
    pytree whose leaves are those arrays, so it can sit in a parameter tree where a float
    kernel would. Layouts per `tag` are in the module docstring.
    """

    tag: str
    in_dim: int
    out_dim: int
    data: Any
    scale: Any = None
    zero: Any = None

    def tree_flatten(self):
        return (self.data, self.scale, self.zero), (self.tag, self.in_dim, self.out_dim)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*aux, *children)

    # -- geometry --------------------------------------------------------------------------

    @property
    def out_major(self) -> bool:
        return self.tag in OUT_MAJOR_TAGS

    @property
    def in_unit(self) -> int:
        """Inputs per indivisible unit along the input axis (a group or block)."""
        if self.tag in ("i4", "u4"):
            return self.in_dim // self.scale.shape[0]
        if self.tag in GGUF_BLOCK_BYTES:
            return GGUF_BLOCK
        return 1

    @property
    def data_rows_per_unit(self) -> int:
        if self.tag in ("i4", "u4"):
            return self.in_unit // 2
        return GGUF_BLOCK_BYTES.get(self.tag, 1)

    @property
    def arrays(self) -> tuple:
        return tuple(a for a in (self.data, self.scale, self.zero) if a is not None)

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in self.arrays)

    # -- slicing and joining (numpy at conversion, jnp inside jits) --------------------------

    def slice_out(self, start: int, stop: int) -> "QuantizedMatrix":
        """Output channels [start, stop): rows of a head, an FFN chunk, a vocabulary chunk."""
        if self.out_major:
            return dataclasses.replace(self, out_dim=stop - start, data=self.data[start:stop],
                                       scale=self.scale[start:stop])
        cut = lambda a: None if a is None else a[:, start:stop]  # noqa: E731
        return dataclasses.replace(self, out_dim=stop - start, data=cut(self.data),
                                   scale=cut(self.scale), zero=cut(self.zero))

    def slice_in(self, start: int, stop: int, name: str = "weight") -> "QuantizedMatrix":
        """Inputs [start, stop) (an FFN chunk of `down`); must cover whole groups or blocks."""
        unit = self.in_unit
        if start % unit or stop % unit:
            raise QuantError(
                f"{name}: inputs [{start}, {stop}) do not cover whole groups of {unit} "
                f"(format {self.tag}); choose schedule.ffn_chunks so every FFN chunk is a "
                f"multiple of {unit} wide")
        if self.out_major:  # i8: per output channel, the scale covers any input range
            return dataclasses.replace(self, in_dim=stop - start, data=self.data[:, start:stop])
        rows = self.data_rows_per_unit
        data = self.data[start // unit * rows:stop // unit * rows]
        if self.tag in ("i4", "u4"):
            cut = lambda a: None if a is None else a[start // unit:stop // unit]  # noqa: E731
            return dataclasses.replace(self, in_dim=stop - start, data=data, scale=cut(self.scale),
                                       zero=cut(self.zero))
        return dataclasses.replace(self, in_dim=stop - start, data=data)

    @classmethod
    def concat_out(cls, parts: list["QuantizedMatrix"]) -> "QuantizedMatrix":
        first = parts[0]
        xp = _xp(first.data)
        axis = 0 if first.out_major else 1
        join = lambda name: (None if getattr(first, name) is None  # noqa: E731
                             else xp.concatenate([getattr(p, name) for p in parts], axis=axis))
        return dataclasses.replace(first, out_dim=sum(p.out_dim for p in parts), data=join("data"),
                                   scale=join("scale"), zero=join("zero"))

    @classmethod
    def concat_in(cls, parts: list["QuantizedMatrix"]) -> "QuantizedMatrix":
        first = parts[0]
        xp = _xp(first.data)
        in_dim = sum(p.in_dim for p in parts)
        if first.out_major:
            return dataclasses.replace(first, in_dim=in_dim,
                                       data=xp.concatenate([p.data for p in parts], axis=1))
        join = lambda name: (None if getattr(first, name) is None  # noqa: E731
                             else xp.concatenate([getattr(p, name) for p in parts], axis=0))
        return dataclasses.replace(first, in_dim=in_dim, data=join("data"), scale=join("scale"),
                                   zero=join("zero"))

    def take_out(self, indices) -> "QuantizedMatrix":
        """Output channels `indices` [n] (an embedding lookup of token ids), inside a jit."""
        axis = 0 if self.out_major else 1
        take = lambda a: None if a is None else jnp.take(a, indices, axis=axis)  # noqa: E731
        return dataclasses.replace(self, out_dim=int(indices.shape[0]), data=take(self.data),
                                   scale=take(self.scale), zero=take(self.zero))

    # -- stored leaves -----------------------------------------------------------------------

    def stored(self, leaf: str, rows: bool = False) -> dict:
        """{stored leaf name: array}; `rows`: the out-major layout embedding rows are read in."""
        arrays = {f"{leaf}_{self.tag}": self.data, f"{leaf}_scale": self.scale,
                  f"{leaf}_zero": self.zero}
        arrays = {k: v for k, v in arrays.items() if v is not None}
        if rows and not self.out_major:
            arrays = {k: v.T for k, v in arrays.items()}
        return arrays

    @classmethod
    def from_stored(cls, leaf: str, arrays: dict, rows: bool = False) -> "QuantizedMatrix":
        """The inverse of `stored`: `arrays` maps stored leaf names (or full keys ending in
        them) of one weight to arrays."""
        tag = stored_tag(leaf, arrays)
        if tag is None:
            raise KeyError(f"no stored array for weight {leaf!r} among {sorted(arrays)}")
        data, scale, zero = (arrays[f"{leaf}_{tag}"], arrays.get(f"{leaf}_scale"),
                             arrays.get(f"{leaf}_zero"))
        if rows and tag not in OUT_MAJOR_TAGS:
            data, scale, zero = (None if a is None else a.T for a in (data, scale, zero))
        if tag in OUT_MAJOR_TAGS:
            out_dim, in_dim = data.shape
        elif tag in ("i4", "u4"):
            in_dim, out_dim = 2 * data.shape[0], data.shape[1]
        elif tag in GGUF_BLOCK_BYTES:
            in_dim, out_dim = data.shape[0] // GGUF_BLOCK_BYTES[tag] * GGUF_BLOCK, data.shape[1]
        else:
            in_dim, out_dim = data.shape
        return cls(tag, int(in_dim), int(out_dim), data, scale, zero)

    # -- dequantization (jnp, inside jits) ---------------------------------------------------

    def dequantize(self, after=None) -> jax.Array:
        """float32 [in_dim, out_dim].

        `after`: an activation the dequantization must wait for (the matmul's input). The
        dequantization reads only parameters, so XLA's scheduler otherwise runs every one at
        the start of a program and keeps all their float32 outputs alive at once: a 30-layer
        SmolLM2 step held 405 MB of temporaries and ran 10x slower (265 vs 25 ms for 30 layers
        of int4 matvecs; docs/quantization.md). A zero derived from `after` (`after[0] * 0`,
        which XLA may not fold: it is NaN for a NaN input, whose matmul is NaN anyway) is added
        to the packed data, so each matrix is dequantized where it is used and its temporary
        freed before the next.
        """
        m = self
        if after is not None:
            zero = (after.reshape(-1)[0] * 0).astype(self.data.dtype)
            m = dataclasses.replace(self, data=self.data + zero)
        return _DEQUANTIZE[m.tag](m)


def stored_tag(leaf: str, arrays) -> str | None:
    """The format tag of weight `leaf` among stored names `arrays`, or None if stored as float."""
    for tag in TAGS:
        if f"{leaf}_{tag}" in arrays:
            return tag
    return None


def stored_keys(key: str, available) -> tuple[str, ...]:
    """The stored keys holding the weight whose float key is `key` (e.g. "L0/q/3/w" ->
    ("L0/q/3/w_i4", "L0/q/3/w_scale")), given the checkpoint's keys `available`."""
    if key in available:
        return (key,)
    tag = stored_tag(key, available)
    if tag is None:
        raise KeyError(f"the checkpoint holds no array for {key!r} (neither float nor quantized)")
    return (f"{key}_{tag}",) + tuple(f"{key}_{c}" for c in COMPANIONS if f"{key}_{c}" in available)


def dequantized_bytes(key: str, shape) -> int:
    """float32 bytes of the matrix a stored quantized array (`…/w_<tag>`) dequantizes to inside
    a jit — a temporary the stage holds beside its stored bytes; 0 for other arrays."""
    name = key.rsplit("/", 1)[-1]  # "w_<tag>"; a GGUF tag has an underscore of its own (q4_1)
    tag = name.split("_", 1)[1] if "_" in name else None
    if tag not in TAGS:
        return 0
    elements = int(np.prod(shape))
    if tag in ("i4", "u4"):
        elements *= 2  # two values per byte
    elif tag in GGUF_BLOCK_BYTES:
        elements = elements // GGUF_BLOCK_BYTES[tag] * GGUF_BLOCK
    return 4 * elements


def largest_dequantized_bytes(keys, arrays) -> int:
    """The largest float32 temporary among stored `keys` (`arrays`: the manifest's entries)."""
    return max((dequantized_bytes(k, arrays[k].shape) for k in keys), default=0)


def matrix(weights: dict, leaf: str, after=None) -> jax.Array:
    """Weight `leaf` of a stage's weights as float32 [in, out] (a float leaf as stored);
    `after`: the activation it multiplies (see `QuantizedMatrix.dequantize`)."""
    if leaf in weights:
        return weights[leaf]
    return QuantizedMatrix.from_stored(leaf, weights).dequantize(after)


def embedding_rows(weights: dict, leaf: str = "w") -> jax.Array:
    """The token rows of the embedding as float32 [T, D], from the rows read for this step."""
    if leaf in weights:
        return weights[leaf]
    return QuantizedMatrix.from_stored(leaf, weights, rows=True).dequantize().T


def dense(value, after=None) -> jax.Array:
    """A parameter as float32: dequantized if quantized (2-D [in, out])."""
    return value.dequantize(after) if isinstance(value, QuantizedMatrix) else value


# -- jnp dequantization, one function per format -------------------------------------------


def _unpack_nibbles(packed_GhO):
    """[n, G/2, out] uint8 -> [n, G, out]: low nibbles are inputs [0, G/2), high ones [G/2, G)."""
    return jnp.concatenate([packed_GhO & 15, packed_GhO >> 4], axis=1)


def _dequantize_i8(m: QuantizedMatrix):
    return (m.data.astype(jnp.float32) * m.scale.astype(jnp.float32)[:, None]).T


def _dequantize_i4(m: QuantizedMatrix):
    groups = m.scale.shape[0]
    q = _unpack_nibbles(m.data.reshape(groups, -1, m.out_dim)).astype(jnp.float32)
    q = q - (8.0 if m.zero is None else m.zero.astype(jnp.float32)[:, None, :])
    return (q * m.scale.astype(jnp.float32)[:, None, :]).reshape(m.in_dim, m.out_dim)


def _f16_field(blocks, byte: int):
    """The little-endian float16 at `byte` of every block, as float32: [n, out]."""
    bits = blocks[:, byte].astype(jnp.uint16) | (blocks[:, byte + 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def _blocks(m: QuantizedMatrix):
    return m.data.reshape(m.in_dim // GGUF_BLOCK, GGUF_BLOCK_BYTES[m.tag], m.out_dim)


def _fifth_bits(blocks, byte: int):
    """Bit j of the little-endian uint32 at `byte` (j = 0..31) as [n, 32, out] uint8 bit 4."""
    qh = sum(blocks[:, byte + i].astype(jnp.uint32) << (8 * i) for i in range(4))
    shifts = jnp.arange(GGUF_BLOCK, dtype=jnp.uint32)[None, :, None]
    return (((qh[:, None, :] >> shifts) & 1) << 4).astype(jnp.uint8)


# The arithmetic mirrors gguf-py's numpy dequantization (d * q, d * q + m) in float32, so
# gguf_native reproduces the float32 weights of `none`.
def _dequantize_q8_0(m):
    b = _blocks(m)
    q = jax.lax.bitcast_convert_type(b[:, 2:], jnp.int8).astype(jnp.float32)
    return (q * _f16_field(b, 0)[:, None, :]).reshape(m.in_dim, m.out_dim)


def _dequantize_q4_0(m):
    b = _blocks(m)
    q = (_unpack_nibbles(b[:, 2:]).astype(jnp.int8) - 8).astype(jnp.float32)
    return (_f16_field(b, 0)[:, None, :] * q).reshape(m.in_dim, m.out_dim)


def _dequantize_q4_1(m):
    b = _blocks(m)
    q = _unpack_nibbles(b[:, 4:]).astype(jnp.float32)
    return (_f16_field(b, 0)[:, None, :] * q + _f16_field(b, 2)[:, None, :]).reshape(m.in_dim, m.out_dim)


def _dequantize_q5_0(m):
    b = _blocks(m)
    q = ((_unpack_nibbles(b[:, 6:]) | _fifth_bits(b, 2)).astype(jnp.int8) - 16).astype(jnp.float32)
    return (_f16_field(b, 0)[:, None, :] * q).reshape(m.in_dim, m.out_dim)


def _dequantize_q5_1(m):
    b = _blocks(m)
    q = (_unpack_nibbles(b[:, 8:]) | _fifth_bits(b, 4)).astype(jnp.float32)
    return (_f16_field(b, 0)[:, None, :] * q + _f16_field(b, 2)[:, None, :]).reshape(m.in_dim, m.out_dim)


_DEQUANTIZE = {"i8": _dequantize_i8, "i4": _dequantize_i4, "u4": _dequantize_i4,
               "f16": lambda m: m.data.astype(jnp.float32), "q8_0": _dequantize_q8_0,
               "q4_0": _dequantize_q4_0, "q4_1": _dequantize_q4_1, "q5_0": _dequantize_q5_0,
               "q5_1": _dequantize_q5_1}


# -- numpy quantizers (conversion) ---------------------------------------------------------


def pack_int4(q_IO: np.ndarray, group: int) -> np.ndarray:
    """Values 0..15 [in, out] -> uint8 [in/2, out], two per byte in GGUF's nibble order."""
    n_in, n_out = q_IO.shape
    if n_in % group or group % 2:
        raise QuantError(f"cannot pack {n_in} inputs in groups of {group}")
    q = q_IO.astype(np.uint8).reshape(n_in // group, group, n_out)
    half = group // 2
    return (q[:, :half] | (q[:, half:] << 4)).reshape(n_in // 2, n_out)


def unpack_int4(packed: np.ndarray, group: int) -> np.ndarray:
    """The inverse of `pack_int4`: uint8 [in/2, out] -> uint8 values 0..15 [in, out]."""
    rows, n_out = packed.shape
    p = packed.reshape(rows * 2 // group, group // 2, n_out)
    return np.concatenate([p & 15, p >> 4], axis=1).reshape(rows * 2, n_out)


def _float16_at_least(x: np.ndarray, name: str) -> np.ndarray:
    """float16 scales no smaller than `x`, so every value still fits the integer range."""
    h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    if not np.all(np.isfinite(h)):
        raise QuantError(f"{name}: a quantization scale exceeds float16's range (|w| up to "
                         f"{float(np.max(x)):.3g} per step); use quant=int8 or none")
    return h


def quantize_int8(w_IO: np.ndarray, name: str = "weight") -> QuantizedMatrix:
    """Symmetric int8 per output channel: scale = max|w| / 127 over the channel's inputs."""
    w = np.asarray(w_IO, np.float32)
    scale = (np.max(np.abs(w), axis=0) / 127).astype(np.float32)
    safe = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    return QuantizedMatrix("i8", w.shape[0], w.shape[1], np.ascontiguousarray(q.T), scale)


def quantize_int4(w_IO: np.ndarray, group: int, asym: bool = False,
                  name: str = "weight") -> QuantizedMatrix:
    """4-bit per group of `group` consecutive inputs of each output (see the module docstring)."""
    w = np.asarray(w_IO, np.float32)
    n_in, n_out = w.shape
    if n_in % group:
        raise QuantError(f"{name}: input dimension {n_in} is not a multiple of the group size "
                         f"{group}; use quant=int8 (per output channel) or a group that divides it")
    g = w.reshape(n_in // group, group, n_out)
    if asym:
        low, high = np.minimum(g.min(axis=1), 0), np.maximum(g.max(axis=1), 0)
        scale = _float16_at_least((high - low) / 15, name)
        safe = np.where(scale > 0, scale, 1).astype(np.float32)
        zero = np.clip(np.rint(-low / safe), 0, 15)
        q = np.clip(np.rint(g / safe[:, None]) + zero[:, None], 0, 15)
        return QuantizedMatrix("u4", n_in, n_out, pack_int4(q.reshape(n_in, n_out), group), scale,
                               zero.astype(np.uint8))
    scale = _float16_at_least(np.abs(g).max(axis=1) / 7, name)
    safe = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.clip(np.rint(g / safe[:, None]), -7, 7) + 8
    return QuantizedMatrix("i4", n_in, n_out, pack_int4(q.reshape(n_in, n_out), group), scale)


def dequantize_np(m: QuantizedMatrix) -> np.ndarray:
    """float32 [in, out] in numpy, for checks (the jnp `dequantize` is what runs)."""
    return np.asarray(jax.jit(QuantizedMatrix.dequantize)(jax.tree_util.tree_map(jnp.asarray, m)))


def error_bound(m: QuantizedMatrix) -> np.ndarray:
    """The analytic bound on |w - dequantized w| per weight, [in, out]: half a step
    (scale / 2) for int8 and both int4 schemes."""
    if m.tag == "i8":
        return np.broadcast_to(m.scale[None, :] / 2, (m.in_dim, m.out_dim))
    if m.tag in ("i4", "u4"):
        return np.repeat(m.scale.astype(np.float32) / 2, m.in_unit, axis=0)
    raise QuantError(f"no analytic bound for format {m.tag!r}")


# -- schemes over a parameter tree -----------------------------------------------------------

# `Decoder` kernels as matrices: (path suffix, number of leading axes that are inputs).
def _matrix_axes(path: tuple[str, ...]) -> int | None:
    if path[-1] != "kernel":
        return None
    return 2 if path[-2] == "o" else 1


def check_scheme(scheme: str, config, ffn_bounds) -> None:
    """Refuse a scheme whose groups do not divide some weight's input dimension (design §6),
    before anything is converted."""
    if scheme not in SCHEMES:
        raise QuantError(f"quant={scheme!r} is not one of: {', '.join(SCHEMES)}")
    group = _REQUANTIZING.get(scheme, (None, 0))[1]
    if not group:
        return
    chunks = sorted({b - a for a, b in zip(ffn_bounds[:-1], ffn_bounds[1:])})
    inputs = [("q, k, v, gate, up and the LM head / embedding (d_model)", config.d_model),
              ("o (n_heads * head_dim)", config.n_heads * config.head_dim),
              ("down (ffn_dim)", config.ffn_dim)]
    inputs += [(f"down of an FFN chunk (schedule.ffn_chunks -> {width} columns)", width)
               for width in chunks]
    for what, dim in inputs:
        if dim % group:
            raise QuantError(
                f"quant={scheme}: the input dimension of {what} is {dim}, not a multiple of the "
                f"group size {group}; use quant=int8 (per output channel, any size), a scheme "
                f"with a group that divides it, or other FFN chunks")


def quantize_params(params: dict, scheme: str) -> dict:
    """The `Decoder` parameter tree with every matrix of `scheme` quantized (numpy in, numpy
    out): kernels become `QuantizedMatrix` [in, out] (q: [D, N*H], o: [N*H, D]); the embedding
    becomes the LM head's view [D, V]. Norms, biases and GPT-2's positions stay float32."""
    if scheme == "none":
        return params
    if scheme not in _REQUANTIZING:
        raise QuantError(f"quant={scheme!r} does not quantize float weights (schemes that do: "
                         f"{', '.join(_REQUANTIZING)})")
    tag, group = _REQUANTIZING[scheme]

    def convert(path, value):
        if isinstance(value, dict):
            return {k: convert(path + (k,), v) for k, v in value.items()}
        name = "/".join(path)
        if path == ("embed", "embedding"):
            w = np.asarray(value, np.float32).T
        elif (axes := _matrix_axes(path)) is not None:
            shape = np.shape(value)
            w = np.asarray(value, np.float32).reshape(int(np.prod(shape[:axes])), -1)
        else:
            return value
        if tag == "i8":
            return quantize_int8(w, name)
        return quantize_int4(w, group, asym=tag == "u4", name=name)

    return convert((), params)


def gguf_native_params(path, config) -> dict:
    """The `Decoder` parameter tree of a GGUF file with its quantized tensors kept as their own
    blocks (`QuantizedMatrix`, input-major); F32/BF16 tensors and vectors come as float32.

    llama.cpp's q/k row permutation is undone on whole rows of blocks (blocks run along the
    input dimension, so a row of blocks is one output channel and stays intact).
    """
    import gguf

    from stagejax.importers.gguf import GGUFFile, GGUFImportError, unpermute_rope_rows

    Q = gguf.GGMLQuantizationType
    native = {Q.Q8_0: "q8_0", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1", Q.Q5_0: "q5_0", Q.Q5_1: "q5_1",
              Q.F16: "f16"}
    tree: dict = {}
    with GGUFFile(path) as f:
        if f.config != config:
            raise QuantError(f"{path}: the file describes another model than {config}")
        for p in f.placements:
            t = f.tensor(p.gguf_name)
            is_matrix = p.transpose or p.param_path == ("embed", "embedding")
            if not is_matrix or t.ggml_type in (Q.F32, Q.BF16):
                value = p.to_param(f.dequantized(p.gguf_name))
            elif t.ggml_type in native:
                rows = t.data if t.ggml_type != Q.F16 else t.data.view(np.float16)
                if p.row_slice is not None:
                    rows = rows[p.row_slice[0]:p.row_slice[1]]
                if p.rope_unpermute_heads:
                    rows = unpermute_rope_rows(rows, p.rope_unpermute_heads)
                tag = native[t.ggml_type]
                value = QuantizedMatrix(tag, int(t.shape[-1]), int(rows.shape[0]),
                                        np.ascontiguousarray(rows.T))
            else:
                raise GGUFImportError(
                    f"{path}: tensor {p.gguf_name!r} has type {t.ggml_type.name}, which "
                    f"quant=gguf_native does not keep natively (kept: "
                    f"{', '.join(q.name for q in native)}); use quant=none")
            node = tree
            for key in p.param_path[:-1]:
                node = node.setdefault(key, {})
            node[p.param_path[-1]] = value
    return tree
