"""The stage-shard layout: the arrays a checkpoint holds, their keys, shapes, order (design §4).

Every array is at the finest atomic granularity of design §3 and keyed like its stage, as a
'/'-separated path of an orbax nested dict (a stage key is a group, its leaves the arrays):

  embed/{c}/w        [V_c, D]  rows of vocab chunk c of the token embedding; when the head is
                               tied it is also LM head chunk c (logits_c = x @ w.T)
  pos_embed/w        [P, D]    GPT-2 only
  L{i}/attn_norm/w   [D]       norm scale (+ /b [D], GPT-2)
  L{i}/q/{h}/w       [D, H]    q kernel[:, h, :] (+ /b [H], GPT-2); likewise L{i}/k/{g}, L{i}/v/{g}
  L{i}/o/w           [N, H, D] (+ /b [D], GPT-2)
  L{i}/ffn_norm/w    [D]       (+ /b [D], GPT-2)
  L{i}/ffn/{c}/gate  [D, F_c]  Llama; /up [D, F_c]; /down [F_c, D];
                               GPT-2: /up_b [F_c], and in chunk 0 only /down_b [D]
  final_norm/w       [D]       (+ /b [D], GPT-2)
  head/{c}/w         [D, V_c]  only when the head is not tied

FFN chunk c covers intermediate columns [ffn_bounds[c], ffn_bounds[c+1]) with `np.array_split`
boundaries; vocab chunk c covers rows [vocab_bounds[c], vocab_bounds[c+1]) with `vocab_chunk` rows
each (the last may be shorter). Both bound lists are recorded in the manifest.

Arrays are listed in stage order (design §3): embed, pos_embed, per layer attn_norm, q heads,
k groups, v groups, o, ffn_norm, FFN chunks; final_norm, head chunks.

Quantization hook: a scheme maps one float32 leaf to the leaves stored for it. "none" stores the
leaf as float32; a later scheme can return e.g. {"w": packed, "w_scale": ..., "w_zero": ...} for
a matrix and keep norms in float32. The parameter layout itself does not change.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from stagejax.model_config import ModelConfig

# One float32 leaf in, the stored leaves out: {leaf name: array}.
QuantScheme = Callable[[str, np.ndarray], dict[str, np.ndarray]]


def _store_float32(leaf: str, w: np.ndarray) -> dict[str, np.ndarray]:
    return {leaf: np.ascontiguousarray(w, dtype=np.float32)}


QUANT_SCHEMES: dict[str, QuantScheme] = {"none": _store_float32}


def ffn_chunk_bounds(ffn_dim: int, ffn_chunks: int) -> list[int]:
    """Column boundaries of the FFN chunks, as `np.array_split` makes them (first chunks longer)."""
    if not 1 <= ffn_chunks <= ffn_dim:
        raise ValueError(f"ffn_chunks must be in [1, ffn_dim={ffn_dim}], got {ffn_chunks}")
    base, extra = divmod(ffn_dim, ffn_chunks)
    sizes = [base + (c < extra) for c in range(ffn_chunks)]
    return [int(b) for b in np.concatenate([[0], np.cumsum(sizes)])]


def vocab_chunk_bounds(vocab_size: int, vocab_chunk: int | None) -> list[int]:
    """Row boundaries of the vocab chunks: `vocab_chunk` rows each, the last one shorter."""
    if not vocab_chunk or vocab_chunk >= vocab_size:
        return [0, vocab_size]
    return list(range(0, vocab_size, vocab_chunk)) + [vocab_size]


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
                 vocab_bounds: list[int]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, float32 array) of every stage shard, in stage order, from `Decoder` parameters.

    Args:
      params: the `Decoder` parameter tree (numpy or JAX arrays; see `stagejax.models.decoder`).
    Yields arrays that are views where the source is already contiguous; the caller copies.
    """
    gpt2 = config.family == "gpt2"
    P = lambda *path: np.asarray(_get(params, path))  # noqa: E731

    embedding_VD = P("embed", "embedding")
    for c, v0, v1 in _chunks(vocab_bounds):
        yield f"embed/{c}/w", embedding_VD[v0:v1]
    if gpt2:
        yield "pos_embed/w", P("pos_embed", "embedding")
    for i in range(config.n_layers):
        L = f"L{i}"
        yield from _norm(params, L, "attn_norm", gpt2)
        for name, n in (("q", config.n_heads), ("k", config.n_kv_heads), ("v", config.n_kv_heads)):
            kernel_DNH = P(L, name, "kernel")
            bias_NH = P(L, name, "bias") if gpt2 else None
            for h in range(n):
                yield f"{L}/{name}/{h}/w", kernel_DNH[:, h, :]
                if gpt2:
                    yield f"{L}/{name}/{h}/b", bias_NH[h]
        yield f"{L}/o/w", P(L, "o", "kernel")
        if gpt2:
            yield f"{L}/o/b", P(L, "o", "bias")
        yield from _norm(params, L, "ffn_norm", gpt2)
        up_DF, down_FD = P(L, "up", "kernel"), P(L, "down", "kernel")
        gate_DF = None if gpt2 else P(L, "gate", "kernel")
        for c, f0, f1 in _chunks(ffn_bounds):
            if not gpt2:
                yield f"{L}/ffn/{c}/gate", gate_DF[:, f0:f1]
            yield f"{L}/ffn/{c}/up", up_DF[:, f0:f1]
            if gpt2:
                yield f"{L}/ffn/{c}/up_b", P(L, "up", "bias")[f0:f1]
            yield f"{L}/ffn/{c}/down", down_FD[f0:f1]
            if gpt2 and c == 0:
                yield f"{L}/ffn/0/down_b", P(L, "down", "bias")
    yield from _norm(params, None, "final_norm", gpt2)
    if not config.tie_embeddings:
        head_DV = P("head", "kernel")
        for c, v0, v1 in _chunks(vocab_bounds):
            yield f"head/{c}/w", head_DV[:, v0:v1]


def _norm(params, layer: str | None, name: str, gpt2: bool):
    path = (layer, name) if layer else (name,)
    prefix = "/".join(path)
    yield f"{prefix}/w", np.asarray(_get(params, path + ("scale",)))
    if gpt2:
        yield f"{prefix}/b", np.asarray(_get(params, path + ("bias",)))


def _get(tree: dict, path: tuple[str, ...]):
    node = tree
    for part in path:
        node = node[part]
    return node


def assemble_params(arrays: dict[str, np.ndarray], config: ModelConfig, ffn_bounds: list[int],
                    vocab_bounds: list[int]) -> dict:
    """The inverse of `shard_arrays`: the `Decoder` parameter tree (numpy float32) from shards.

    Used to load every weight at once (the `model` schedule) and to prove the round trip exact.
    """
    gpt2 = config.family == "gpt2"
    A = arrays.__getitem__
    n_vocab = len(vocab_bounds) - 1
    n_ffn = len(ffn_bounds) - 1

    def norm(prefix: str) -> dict:
        out = {"scale": A(f"{prefix}/w")}
        if gpt2:
            out["bias"] = A(f"{prefix}/b")
        return out

    def cat(key: str, n: int, axis: int = 0) -> np.ndarray:  # key has {c} for the chunk
        return np.concatenate([A(key.format(c=c)) for c in range(n)], axis=axis)

    params: dict = {"embed": {"embedding": cat("embed/{c}/w", n_vocab)}}
    if gpt2:
        params["pos_embed"] = {"embedding": A("pos_embed/w")}
    for i in range(config.n_layers):
        L = f"L{i}"
        layer: dict = {"attn_norm": norm(f"{L}/attn_norm"), "ffn_norm": norm(f"{L}/ffn_norm")}
        for name, n in (("q", config.n_heads), ("k", config.n_kv_heads), ("v", config.n_kv_heads)):
            layer[name] = {"kernel": np.stack([A(f"{L}/{name}/{h}/w") for h in range(n)], axis=1)}
            if gpt2:
                layer[name]["bias"] = np.stack([A(f"{L}/{name}/{h}/b") for h in range(n)])
        layer["o"] = {"kernel": A(f"{L}/o/w")}
        if gpt2:
            layer["o"]["bias"] = A(f"{L}/o/b")
        if not gpt2:
            layer["gate"] = {"kernel": cat(L + "/ffn/{c}/gate", n_ffn, axis=1)}
        layer["up"] = {"kernel": cat(L + "/ffn/{c}/up", n_ffn, axis=1)}
        layer["down"] = {"kernel": cat(L + "/ffn/{c}/down", n_ffn)}
        if gpt2:
            layer["up"]["bias"] = cat(L + "/ffn/{c}/up_b", n_ffn)
            layer["down"]["bias"] = A(f"{L}/ffn/0/down_b")
        params[L] = layer
    params["final_norm"] = norm("final_norm")
    if not config.tie_embeddings:
        params["head"] = {"kernel": cat("head/{c}/w", n_vocab, axis=1)}
    return params


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
