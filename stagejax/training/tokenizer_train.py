"""The training corpus's own tokenizer: byte-level BPE trained on the train split, cached.

Byte-level BPE (the `tokenizers` library; GPT-2's pre-tokenizer regex and byte alphabet) maps any
UTF-8 text to ids and back without loss, so losses are comparable per byte and no text is ever
`<unk>`. The vocabulary is the 256 byte symbols plus `vocab_size - 256` merges learned from the
train split only (valid and test never influence it); there are no special tokens, because the
corpus has no document markers for them to stand for.

The trained tokenizer and the token ids of every split are cached under
`${paths.cache}/training/<corpus>-bpe<V>-<hash>/`, where the hash covers the train split's sha256
and the training parameters: a changed corpus or setting is a different directory, never a stale
reuse. The directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from stagejax import data as data_files
from stagejax_device.results import atomic_write_json
from stagejax.store.convert import resolve_cache_dir
from stagejax.tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when the cached layout or the training recipe changes
SPLITS = ("train", "valid", "test")
TOKEN_DTYPE = np.uint16  # vocab_size <= 65535 (checked by TokenizerSettings)
HASH_CHARS = 16


@dataclasses.dataclass(frozen=True)
class TokenizedCorpus:
    """A trained tokenizer and the token ids of each split (uint16 arrays, memory-mapped)."""

    tokenizer: Tokenizer
    tokens: dict  # split -> np.ndarray of ids
    n_bytes: dict  # split -> UTF-8 bytes of the text
    directory: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def bytes_per_token(self, split: str) -> float:
        return self.n_bytes[split] / len(self.tokens[split])


def train_bpe(text: str, vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids trained on `text`."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[],
        # Every byte is a symbol even if the text lacks it, so no input can be unencodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(f"the text has too few distinct pairs for {vocab_size} ids (got "
                         f"{backend.get_vocab_size()}); lower tokenizer.vocab_size or "
                         "tokenizer.min_frequency")
    return Tokenizer(backend)


def encode_text(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """The ids of `text`, encoded line by line (parallel in the Rust backend).

    Line-wise encoding may split a whitespace run at a newline differently from encoding the text
    as one string; both decode to the same bytes, and this is the split's defined token stream.
    """
    encodings = tokenizer.backend.encode_batch(text.splitlines(keepends=True),
                                               add_special_tokens=False)
    ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.int64)
    if ids.size and ids.max() > np.iinfo(TOKEN_DTYPE).max:
        raise ValueError(f"token id {ids.max()} does not fit {np.dtype(TOKEN_DTYPE).name}")
    return ids.astype(TOKEN_DTYPE)


def decode_ids(tokenizer: Tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids])


def cache_key(train_sha256: str, vocab_size: int, min_frequency: int) -> str:
    payload = json.dumps({"format": FORMAT_VERSION, "train_sha256": train_sha256,
                          "vocab_size": vocab_size, "min_frequency": min_frequency},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:HASH_CHARS]


def load_corpus(corpus: str = "pydocs", vocab_size: int = 4096, min_frequency: int = 2,
                data_dir=None, cache_dir=None) -> TokenizedCorpus:
    """The tokenizer trained on `<corpus>/train.txt` and every split's ids, from the cache or
    made now (and cached).

    Args:
      corpus: directory under the data directory holding train.txt, valid.txt, test.txt.
      vocab_size, min_frequency: BPE training parameters.
      data_dir: `paths.data`; None: `$STAGEJAX_DATA` or `../shared/data` from the repo root.
      cache_dir: `paths.cache`; None: `$STAGEJAX_CACHE` or `~/.cache/stagejax`.
    """
    texts = {split: data_files.read_text(f"{corpus}/{split}.txt", data_dir) for split in SPLITS}
    train_sha = hashlib.sha256(texts["train"].encode("utf-8")).hexdigest()
    root = resolve_cache_dir(cache_dir) / "training"
    directory = root / f"{corpus}-bpe{vocab_size}-{cache_key(train_sha, vocab_size, min_frequency)}"
    if not (directory / "meta.json").is_file():
        _build_cache(directory, texts, vocab_size, min_frequency, train_sha)
    meta = json.loads((directory / "meta.json").read_text())
    backend = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokens = {split: np.load(directory / f"{split}.npy", mmap_mode="r") for split in SPLITS}
    for split in SPLITS:
        if len(tokens[split]) != meta["n_tokens"][split]:
            raise ValueError(f"cached {directory / (split + '.npy')} has {len(tokens[split])} "
                             f"tokens, its meta.json says {meta['n_tokens'][split]}; delete "
                             f"{directory} to rebuild it")
    return TokenizedCorpus(Tokenizer(backend), tokens, dict(meta["n_bytes"]), directory)


def _build_cache(directory: Path, texts: dict, vocab_size: int, min_frequency: int,
                 train_sha: str) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tokenizer = train_bpe(texts["train"], vocab_size, min_frequency)
        tokenizer.backend.save(str(tmp / "tokenizer.json"))
        n_tokens, n_bytes = {}, {}
        for split, text in texts.items():
            ids = encode_text(tokenizer, text)
            np.save(tmp / f"{split}.npy", ids)
            n_tokens[split], n_bytes[split] = int(len(ids)), len(text.encode("utf-8"))
        atomic_write_json(tmp / "meta.json", {
            "format": FORMAT_VERSION, "train_sha256": train_sha, "vocab_size": vocab_size,
            "min_frequency": min_frequency, "n_tokens": n_tokens, "n_bytes": n_bytes})
        try:
            tmp.rename(directory)
        except OSError:
            # Another process finished the same cache first; its contents are identical.
            if not (directory / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
