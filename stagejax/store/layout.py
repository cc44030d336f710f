"""The stage-shard layout: the arrays a checkpoint holds, their keys, shapes, order (design §4).

Every array is at the finest atomic granularity of design §3 and keyed like its stage, as a
'/'-separated path of an orbax nested dict (a stage key is a group, its leaves the arrays):

  embed/{c}/w        [V_c, D]  rows of vocab chunk c of the token embedding; when the head is
                               tied it is also LM head chunk c (logits_c = x @ w.T)
  pos_embed/w        [P, D]    learned positions only (`Family.learned_positions`)
  L{i}/attn_norm/w   [D]       norm scale (+ /b [D] in families with biases)
  L{i}/q/{h}/w       [D, H]    q kernel[:, h, :] (+ /b [H]); likewise L{i}/k/{g}, L{i}/v/{g}
  L{i}/q/{h}/norm    [H]       QK-norm families: the layer's q_norm scale, in every head's
                               shard (likewise L{i}/k/{g}/norm): a stage reads its own shard
  L{i}/o/w           [N, H, D] (+ /b [D])
  L{i}/ffn_norm/w    [D]       (+ /b [D])
  L{i}/ffn/{c}/gate  [D, F_c]  SwiGLU only; /up [D, F_c]; /down [F_c, D];
                               with biases: /up_b [F_c], and in chunk 0 only /down_b [D]
  final_norm/w       [D]       (+ /b [D])
  head/{c}/w         [D, V_c]  only when the head is not tied

FFN chunk c covers intermediate columns [ffn_bounds[c], ffn_bounds[c+1]) with `np.array_split`
boundaries; vocab chunk c covers rows [vocab_bounds[c], vocab_bounds[c+1]) with `vocab_chunk` rows
each (the last may be shorter). Both bound lists are recorded in the manifest.

Arrays are listed in stage order (design §3): embed, pos_embed, per layer attn_norm, q heads,
k groups, v groups, o, ffn_norm, FFN chunks; final_norm, head chunks.

Quantization (`stagejax.quant`): a quantized matrix is stored as several arrays beside each
other, named after its float leaf: `L{i}/q/{h}/w_i4` + `L{i}/q/{h}/w_scale` (+ `w_zero`),
`L{i}/ffn/{c}/gate_q4_1`, ... Matrices are sliced *after* quantization — heads and chunks of
output channels, FFN chunks of `down` along whole input groups — so every shard's scales are
those of the full matrix. Embedding rows are stored out-major (one row per token); with a tied
head in an input-major format, `head/{c}/w_*` holds the head's copy (see `stagejax.quant`).
Norms, biases and learned position embeddings stay float32.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from stagejax.model_config import ModelConfig
from stagejax.quant import SCHEMES as QUANT_SCHEMES
from stagejax.quant import QuantizedMatrix, stored_tag
from stagejax.stages import chunk_bounds, split_bounds

__all__ = ["QUANT_SCHEMES", "assemble_params", "ffn_chunk_bounds", "flatten", "nest",
           "normalize_vocab_chunk", "params_spec", "shard_arrays", "stored_arrays",
           "vocab_chunk_bounds"]


def ffn_chunk_bounds(ffn_dim: int, ffn_chunks: int) -> list[int]:
    """Column boundaries of the FFN chunks, as `np.array_split` makes them (first chunks longer):
    the stages' own cut (`stages.split_bounds`), checked with the setting's name."""
    if not 1 <= ffn_chunks <= ffn_dim:
        raise ValueError(f"ffn_chunks must be in [1, ffn_dim={ffn_dim}], got {ffn_chunks}")
    return list(split_bounds(ffn_dim, ffn_chunks))


def vocab_chunk_bounds(vocab_size: int, vocab_chunk: int | None) -> list[int]:
    """Row boundaries of the vocab chunks: `vocab_chunk` rows each, the last one shorter."""
    if not vocab_chunk or vocab_chunk >= vocab_size:
        return [0, vocab_size]
    return list(chunk_bounds(vocab_size, vocab_chunk))


def normalize_vocab_chunk(vocab_size: int, vocab_chunk: int | None) -> int | None:
    """The canonical value (None for "one chunk"), so equal layouts hash equally."""
    if vocab_chunk is not None and vocab_chunk < 0:
        raise ValueError(f"vocab_chunk must be >= 0 (0 or None: the whole vocabulary), "
                         f"got {vocab_chunk}")
    return None if not vocab_chunk or vocab_chunk >= vocab_size else int(vocab_chunk)


def _chunks(bounds: list[int]) -> Iterator[tuple[int, int, int]]:
    for c, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        yield c, start, stop


def shard_arrays(params: dict, config: ModelConfig, ffn_bounds: list[int],
                 vocab_bounds: list[int]) -> Iterator[tuple[str, "np.ndarray | QuantizedMatrix"]]:
    """(float key, value) of every stage shard, in stage order, from `Decoder` parameters.

    Args:
      params: the `Decoder` parameter tree (numpy or JAX arrays; see `stagejax.models.decoder`),
        its matrices possibly `QuantizedMatrix` (from `stagejax.quant.quantize_params`).
    Yields float arrays (views where the source is already contiguous; the caller copies) or
    `QuantizedMatrix` slices; `stored_arrays` turns either into the arrays to save.
    """
    config.require_dense("Stage shards")
    family = config.traits
    P = lambda *path: _get(params, path)  # noqa: E731
    F = lambda *path: np.asarray(_get(params, path))  # noqa: E731  float leaves
    H = config.head_dim

    embedding = P("embed", "embedding")
    quantized_embedding = isinstance(embedding, QuantizedMatrix)
    if not quantized_embedding:
        embedding = np.asarray(embedding)
    for c, v0, v1 in _chunks(vocab_bounds):
        yield f"embed/{c}/w", (embedding.slice_out(v0, v1) if quantized_embedding
                               else embedding[v0:v1])
    if family.learned_positions:
        yield "pos_embed/w", F("pos_embed", "embedding")
    for i in range(config.n_layers):
        L = f"L{i}"
        yield from _norm(params, L, "attn_norm", family.biases)
        for name, n in (("q", config.n_heads), ("k", config.n_kv_heads), ("v", config.n_kv_heads)):
            kernel = P(L, name, "kernel")
            bias_NH = F(L, name, "bias") if family.biases else None
            for h in range(n):
                yield f"{L}/{name}/{h}/w", (kernel.slice_out(h * H, (h + 1) * H)
                                            if isinstance(kernel, QuantizedMatrix)
                                            else np.asarray(kernel)[:, h, :])
                if family.biases:
                    yield f"{L}/{name}/{h}/b", bias_NH[h]
                if family.qk_norm and name in ("q", "k"):  # each head's shard holds the scale
                    yield f"{L}/{name}/{h}/norm", F(L, f"{name}_norm", "scale")
        o = P(L, "o", "kernel")
        yield f"{L}/o/w", o if isinstance(o, QuantizedMatrix) else np.asarray(o)
        if family.biases:
            yield f"{L}/o/b", F(L, "o", "bias")
        yield from _norm(params, L, "ffn_norm", family.biases)
        up, down = P(L, "up", "kernel"), P(L, "down", "kernel")
        gate = P(L, "gate", "kernel") if family.gated_ffn else None
        for c, f0, f1 in _chunks(ffn_bounds):
            if family.gated_ffn:
                yield f"{L}/ffn/{c}/gate", _columns(gate, f0, f1)
            yield f"{L}/ffn/{c}/up", _columns(up, f0, f1)
            if family.biases:
                yield f"{L}/ffn/{c}/up_b", F(L, "up", "bias")[f0:f1]
            yield f"{L}/ffn/{c}/down", (down.slice_in(f0, f1, f"{L}/ffn/{c}/down")
                                        if isinstance(down, QuantizedMatrix)
                                        else np.asarray(down)[f0:f1])
            if family.biases and c == 0:
                yield f"{L}/ffn/0/down_b", F(L, "down", "bias")
    yield from _norm(params, None, "final_norm", family.biases)
    if not config.tie_embeddings:
        head = P("head", "kernel")
        for c, v0, v1 in _chunks(vocab_bounds):
            yield f"head/{c}/w", _columns(head, v0, v1)
    elif quantized_embedding and not embedding.out_major:
        # The tied head's copy in the input-major layout its matvec needs (stagejax.quant).
        for c, v0, v1 in _chunks(vocab_bounds):
            yield f"head/{c}/w", embedding.slice_out(v0, v1)


def _columns(kernel, start: int, stop: int):
    """Output columns [start, stop) of an [in, out] kernel, float or quantized."""
    if isinstance(kernel, QuantizedMatrix):
        return kernel.slice_out(start, stop)
    return np.asarray(kernel)[:, start:stop]


def stored_arrays(key: str, value) -> dict[str, np.ndarray]:
    """The arrays saved for one shard of `shard_arrays`: {stored key: C-contiguous array}.
    Float leaves are stored as float32; embedding rows of a quantized matrix out-major."""
    if isinstance(value, QuantizedMatrix):
        group, leaf = key.rsplit("/", 1)
        stored = value.stored(leaf, rows=key.startswith("embed/"))
        return {f"{group}/{name}": np.ascontiguousarray(a) for name, a in stored.items()}
    return {key: np.ascontiguousarray(value, dtype=np.float32)}


def _norm(params, layer: str | None, name: str, biases: bool):
    path = (layer, name) if layer else (name,)
    prefix = "/".join(path)
    yield f"{prefix}/w", np.asarray(_get(params, path + ("scale",)))
    if biases:
        yield f"{prefix}/b", np.asarray(_get(params, path + ("bias",)))


def _get(tree: dict, path: tuple[str, ...]):
    node = tree
    for part in path:
        node = node[part]
    return node


def assemble_params(arrays: dict, config: ModelConfig, ffn_bounds: list[int],
                    vocab_bounds: list[int]) -> dict:
    """The inverse of `shard_arrays`: the `Decoder` parameter tree from stored shards.

    Float shards give float32 arrays; quantized ones give `QuantizedMatrix` leaves holding the
    stored bytes (joined, never dequantized), so the `model` schedule runs the same stored
    weights as the staged ones, dequantized inside its jit. `arrays` may be numpy (loading) or
    JAX values (`params_spec` traces it for shapes). The tied embedding of an input-major format
    is assembled from the head's copy (`head/{c}`), which serves lookups and the head alike.
    """
    family = config.traits
    A = arrays.__getitem__
    n_vocab = len(vocab_bounds) - 1
    n_ffn = len(ffn_bounds) - 1
    xp = np if isinstance(next(iter(arrays.values())), np.ndarray) else _jnp()

    def load(key: str, rows: bool = False):
        if key in arrays:
            return arrays[key]
        return QuantizedMatrix.from_stored(key, arrays, rows=rows)

    def norm(prefix: str) -> dict:
        out = {"scale": A(f"{prefix}/w")}
        if family.biases:
            out["bias"] = A(f"{prefix}/b")
        return out

    def cat(key: str, n: int, axis: int = 0, rows: bool = False):  # key has {c} for the chunk
        parts = [load(key.format(c=c), rows) for c in range(n)]
        if isinstance(parts[0], QuantizedMatrix):
            # float axis 1 (of [in, out]) is a quantized matrix's output axis; axis 0 its input
            # axis, except for embedding rows ([V, D]: rows are outputs).
            join = QuantizedMatrix.concat_out if axis == 1 or rows else QuantizedMatrix.concat_in
            return join(parts)
        return xp.concatenate(parts, axis=axis)

    head_copy = config.tie_embeddings and stored_tag("head/0/w", arrays) is not None
    embedding = (cat("head/{c}/w", n_vocab, axis=1) if head_copy
                 else cat("embed/{c}/w", n_vocab, rows=True))
    params: dict = {"embed": {"embedding": embedding}}
    if family.learned_positions:
        params["pos_embed"] = {"embedding": A("pos_embed/w")}
    for i in range(config.n_layers):
        L = f"L{i}"
        layer: dict = {"attn_norm": norm(f"{L}/attn_norm"), "ffn_norm": norm(f"{L}/ffn_norm")}
        for name, n in (("q", config.n_heads), ("k", config.n_kv_heads), ("v", config.n_kv_heads)):
            heads = [load(f"{L}/{name}/{h}/w") for h in range(n)]
            layer[name] = {"kernel": (QuantizedMatrix.concat_out(heads)
                                      if isinstance(heads[0], QuantizedMatrix)
                                      else xp.stack(heads, axis=1))}
            if family.biases:
                layer[name]["bias"] = xp.stack([A(f"{L}/{name}/{h}/b") for h in range(n)])
            if family.qk_norm and name in ("q", "k"):
                layer[f"{name}_norm"] = {"scale": A(f"{L}/{name}/0/norm")}
        layer["o"] = {"kernel": load(f"{L}/o/w")}
        if family.biases:
            layer["o"]["bias"] = A(f"{L}/o/b")
        if family.gated_ffn:
            layer["gate"] = {"kernel": cat(L + "/ffn/{c}/gate", n_ffn, axis=1)}
        layer["up"] = {"kernel": cat(L + "/ffn/{c}/up", n_ffn, axis=1)}
        layer["down"] = {"kernel": cat(L + "/ffn/{c}/down", n_ffn)}
        if family.biases:
            layer["up"]["bias"] = cat(L + "/ffn/{c}/up_b", n_ffn)
            layer["down"]["bias"] = A(f"{L}/ffn/0/down_b")
        params[L] = layer
    params["final_norm"] = norm("final_norm")
    if not config.tie_embeddings:
        params["head"] = {"kernel": cat("head/{c}/w", n_vocab, axis=1)}
    return params


def _jnp():
    import jax.numpy as jnp

    return jnp


def params_spec(manifest) -> dict:
    """Shapes and dtypes (`jax.ShapeDtypeStruct`) of `assemble_params` over a checkpoint's
    arrays, without reading them: what the `model` schedule compiles for."""
    import jax

    specs = {key: jax.ShapeDtypeStruct(info.shape, np.dtype(info.dtype))
             for key, info in manifest.arrays.items()}
    return jax.eval_shape(lambda arrays: assemble_params(
        arrays, ModelConfig.from_dict(manifest.config), list(manifest.ffn_chunk_bounds),
        list(manifest.vocab_chunk_bounds)), specs)


def nest(flat: dict[str, np.ndarray]) -> dict:
    """{'a/b/c': x} -> {'a': {'b': {'c': x}}}: the nested dict orbax saves."""
    tree: dict = {}
    for key, value in flat.items():
        *groups, leaf = key.split("/")
        node = tree
        for group in groups:
            node = node.setdefault(group, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """The inverse of `nest`."""
    out = {}
    for name, value in tree.items():
        key = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(value, dict):
            out.update(flatten(value, key))
        else:
            out[key] = value
    return out
