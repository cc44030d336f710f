"""A compact byte-level BPE tokenizer for the device runtime: ids equal to Hugging Face
`tokenizers`' for the byte-level BPE models stagejax imports (GPT-2 style: the GPT-2
pre-tokenizer regex, bytes mapped to printable characters, merges by rank), at a few MB.

`compile_tokenizer(tokenizer.json, out.npz)` (run by `stagejax.export`) turns the
`tokenizers` file into flat arrays: every token's bytes in one blob with offsets, the merges as
(left id, right id, merged id) in rank order, the special (added) tokens, and the Unicode
letter and number ranges of the pre-tokenizer's \\p{L} and \\p{N} classes (from the
exporting Python's `unicodedata`, so the runtime needs no regex package). `Tokenizer.load`
reads them (no JSON of 2 MB parsed into tens of thousands of Python strings) and keeps the
merges as sorted numpy arrays searched per pair.

Encoding: the text is split on special tokens (recognised wherever they appear, as
`tokenizers` does with add_special_tokens=False); each remaining run is pre-tokenized with the
GPT-2 pattern, each piece's UTF-8 bytes become byte tokens, and the lowest-ranked adjacent pair
is merged until none is left (cached per piece).
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import numpy as np

# The White_Space characters (the regex engines of `tokenizers` mean these by \s; Python's \s
# would also take \x1c-\x1f).
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


def byte_to_unicode() -> list[str]:
    """GPT-2's printable stand-in character for each byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


def _category_ranges(prefix: str) -> np.ndarray:
    """[n, 2] inclusive code point ranges of the Unicode categories starting with `prefix`."""
    ranges, start = [], None
    for code in range(0x110000):
        inside = unicodedata.category(chr(code)).startswith(prefix)
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append((start, code - 1))
            start = None
    if start is not None:
        ranges.append((start, 0x10FFFF))
    return np.asarray(ranges, np.int32)


def compile_tokenizer(tokenizer_json: str | Path, out: str | Path, bos_token_id=None,
                      eos_token_id=None, add_bos: bool = False) -> Path:
    """Write the compact form of a byte-level BPE `tokenizer.json`; refuse other kinds."""
    data = json.loads(Path(tokenizer_json).read_text())
    model, pre = data["model"], data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or data.get("normalizer"):
        raise ValueError(f"{tokenizer_json}: the device tokenizer handles byte-level BPE without a "
                         f"normalizer (model {model.get('type')}, pre-tokenizer {pre.get('type')}, "
                         f"normalizer {data.get('normalizer')})")
    if pre.get("add_prefix_space"):
        raise ValueError(f"{tokenizer_json}: ByteLevel with add_prefix_space is not supported by "
                         "the device tokenizer")
    decode_byte = {c: b for b, c in enumerate(byte_to_unicode())}
    vocab = model["vocab"]
    n = max(vocab.values()) + 1
    specials = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    n = max([n] + [i + 1 for i in specials])
    blobs = [b""] * n
    for token, token_id in vocab.items():
        blobs[token_id] = bytes(decode_byte[c] for c in token)
    for token_id, content in specials.items():
        blobs[token_id] = content.encode("utf-8")
    offsets = np.zeros(n + 1, np.int32)
    offsets[1:] = np.cumsum([len(b) for b in blobs])
    merges = model["merges"]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    merge_ids = np.asarray([(vocab[a], vocab[b], vocab[a + b]) for a, b in pairs], np.int32).reshape(-1, 3)
    # A byte with no token of its own (never seen in training) is dropped, as `tokenizers`
    # does for a BPE model without an unknown token.
    byte_ids = np.asarray([vocab.get(c, -1) for c in byte_to_unicode()], np.int32)
    special_ids = np.asarray(sorted(specials), np.int32)
    out = Path(out)
    with open(out, "wb") as handle:
        np.savez(handle, token_bytes=np.frombuffer(b"".join(blobs), np.uint8), token_offsets=offsets,
                 merges=merge_ids, byte_ids=byte_ids, special_ids=special_ids,
                 letters=_category_ranges("L"), numbers=_category_ranges("N"),
                 meta=np.frombuffer(json.dumps({"bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
                                                "add_bos": add_bos, "use_regex": pre.get("use_regex", True),
                                                "ignore_merges": bool(model.get("ignore_merges"))}).encode(),
                                    np.uint8))
    return out


def _char_class(ranges: np.ndarray) -> str:
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in ranges.tolist())


_NO_MERGE = np.iinfo(np.int64).max


class Tokenizer:
    """Encode and decode with a compiled tokenizer (`compile_tokenizer`)."""

    def __init__(self, path: str | Path):
        with np.load(path) as files:
            self._bytes = files["token_bytes"].tobytes()
            self._offsets = files["token_offsets"]
            merges = files["merges"]
            self._byte_ids = files["byte_ids"].tolist()
            special_ids = files["special_ids"].tolist()
            letters, numbers = _char_class(files["letters"]), _char_class(files["numbers"])
            meta = json.loads(files["meta"].tobytes())
        self.bos_token_id, self.eos_token_id = meta["bos_token_id"], meta["eos_token_id"]
        self.add_bos = meta["add_bos"]
        self._use_regex = meta["use_regex"]  # False: the whole text is one piece (byte tokenizers)
        self.vocab_size = len(self._offsets) - 1
        # Merges as sorted (left << 32 | right) keys with (rank << 32 | merged id) beside them: a
        # binary search per adjacent pair. A dictionary of SmolLM2's 48,900 merges as Python
        # ints held ~12 MB resident; these arrays hold 0.8 MB.
        left, right, merged = (merges[:, i].astype(np.int64) for i in range(3))
        keys = (left << 32) | right
        order = np.argsort(keys, kind="stable")
        self._pair_keys = keys[order]
        self._pair_values = ((np.arange(len(merges), dtype=np.int64) << 32) | merged)[order]
        self._special = {self.token_bytes(i).decode("utf-8"): i for i in special_ids}
        self._special_split = (re.compile("(" + "|".join(re.escape(s) for s in sorted(self._special, key=len, reverse=True)) + ")")
                               if self._special else None)
        s = _WHITESPACE
        self._pattern = re.compile(
            rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+| ?[^{s}{letters}{numbers}]+|[{s}]+(?![^{s}])|[{s}]+")
        self._cache: dict[bytes, tuple[int, ...]] = {}

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[int(self._offsets[token_id]):int(self._offsets[token_id + 1])]

    def _bpe(self, piece: bytes) -> tuple[int, ...]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        ids = [i for i in (self._byte_ids[b] for b in piece) if i >= 0]
        keys, values = self._pair_keys, self._pair_values
        while len(ids) > 1 and len(keys):
            array = np.asarray(ids, np.int64)
            pairs = (array[:-1] << 32) | array[1:]
            at = np.minimum(np.searchsorted(keys, pairs), len(keys) - 1)
            found = np.where(keys[at] == pairs, values[at], _NO_MERGE)
            best_at = int(found.argmin())
            best = int(found[best_at])
            if best == _NO_MERGE:
                break
            merged = best & 0xFFFFFFFF
            pair = (ids[best_at], ids[best_at + 1])
            out, i = [], 0
            while i < len(ids):  # merge every occurrence of the pair, left to right
                if i < len(ids) - 1 and (ids[i], ids[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        result = tuple(ids)
        if len(self._cache) < 200_000 and len(piece) < 256:  # bounded: a long text's distinct pieces
            self._cache[piece] = result
        return result

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised."""
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        parts = self._special_split.split(text) if self._special_split else [text]
        for k, part in enumerate(parts):
            if k % 2:  # the separators: special tokens
                ids.append(self._special[part])
                continue
            for piece in self._pattern.findall(part) if self._use_regex else [part]:
                ids.extend(self._bpe(piece.encode("utf-8")))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        specials = set(self._special.values()) if skip_special_tokens else ()
        return b"".join(self.token_bytes(i) for i in ids if i not in specials).decode("utf-8", errors="replace")
