"""Text <-> token ids, and the chat template, for imported models.

Wraps a `tokenizers.Tokenizer` (built from a GGUF vocabulary and merges, or read from a Hugging
Face `tokenizer.json`) with the model's special ids and its Jinja chat template, rendered the
way transformers renders it (sandboxed Jinja, `trim_blocks`/`lstrip_blocks`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import pre_tokenizers

# A long text is encoded in pieces of about this many characters: `tokenizers` keeps per-token
# strings and offsets for a whole call (~650 bytes a token: 200 MB for WikiText-2's test set),
# a piece's only until its ids are copied out. Sized for a byte-level vocabulary (a token per
# character): pieces of 16K characters held ~10 MB, outside every plan.
ENCODE_PIECE_CHARS = 1 << 11
# Where GPT-2's byte-level split regex cuts the same whether or not the text continues: at a line
# break between two visible ASCII characters, or before one space and a visible character. (A
# whitespace run before a visible character gives its last character to the next pre-token, so
# "\n\nx" and "\r\nx" split inside the run; before " x" the run ends at the break either way.)
_PIECE_BOUNDARY = re.compile(r"(?<=[!-~])\n(?=[!-~])|\n(?= [!-~])")


@dataclasses.dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    add_bos: bool = False
    chat_template: str | None = None
    merges_free: bool = False  # one token per byte: any cut of the text encodes the same

    @classmethod
    def from_checkpoint(cls, manifest) -> "Tokenizer":
        """The model's tokenizer, rebuilt from a stage-shard checkpoint's `tokenizer.json`."""
        info = manifest.tokenizer_info
        backend = tokenizers.Tokenizer.from_file(str(manifest.tokenizer_file()))
        return cls(backend, bos_token_id=info["bos_token_id"], eos_token_id=info["eos_token_id"],
                   add_bos=info["add_bos"], chat_template=info["chat_template"])

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def encode_array(self, text: str | Iterable[str], max_tokens: int | None = None) -> np.ndarray:
        """`encode(text)[:max_tokens]` as an int32 array, in bounded memory. `text` may come
        as consecutive pieces (`data.iter_text`): what is joined is what is encoded.

        Where the tokenizer splits text the same way whether or not it is cut at a line start
        (byte-level pre-tokenization, no normaliser), the text is encoded in pieces of
        ~`ENCODE_PIECE_CHARS` characters cut there, and read only until `max_tokens` are
        known; otherwise joined and encoded in one call."""
        chunks = [text] if isinstance(text, str) else text
        if not self._cuts_at_line_starts():
            return np.asarray(self.encode("".join(chunks)), np.int32)[:max_tokens]
        parts: list[np.ndarray] = []
        if self.add_bos and self.bos_token_id is not None:
            parts.append(np.asarray([self.bos_token_id], np.int32))
        count = sum(len(p) for p in parts)  # tokens encoded so far
        limit = np.inf if max_tokens is None else max_tokens

        pending = ""
        for chunk in chunks:
            pending += chunk
            # Cut only where the boundary's context (a character before, two after) is read.
            while count < limit and (cut := _PIECE_BOUNDARY.search(pending, ENCODE_PIECE_CHARS)):
                parts.append(np.asarray(self.encode(pending[:cut.end()], add_bos=False), np.int32))
                count += len(parts[-1])
                pending = pending[cut.end():]
            if count >= limit:
                break
        else:
            if pending:
                parts.append(np.asarray(self.encode(pending, add_bos=False), np.int32))
        return (np.concatenate(parts) if parts else np.zeros(0, np.int32))[:max_tokens]

    def _cuts_at_line_starts(self) -> bool:
        pre = self.backend.pre_tokenizer
        return (self.backend.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel)
                and not pre.add_prefix_space
                and (pre.use_regex or self.merges_free))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's chat template."""
        if not self.chat_template:
            raise ValueError("this model has no chat template (the GGUF has no "
                             "'tokenizer.chat_template' field); run with decode.chat=false")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        special = {}
        for key, token_id in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id)):
            if token_id is not None:
                special[key] = self.token(token_id)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **special)


def byte_tokenizer(vocab_size: int, eos_token_id: int | None = None) -> Tokenizer:
    """One token per UTF-8 byte (ids 0..255), for random-weight models that have no vocabulary.

    It lets every preset run the same generate/perplexity path on real text; ids above 255
    exist in the model but are never produced by encoding.
    """
    if vocab_size < 256:
        raise ValueError(f"a byte tokenizer needs vocab_size >= 256, got {vocab_size}")
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order the vocabulary by byte value.
    byte_to_char = {b: c for b, c in zip(range(256), _byte_level_chars())}
    assert set(byte_to_char.values()) == set(alphabet)
    vocab = {byte_to_char[b]: b for b in range(256)}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, bos_token_id=None, eos_token_id=eos_token_id, add_bos=False,
                     merges_free=True)


def _byte_level_chars() -> list[str]:
    """GPT-2's bytes_to_unicode table, as a list indexed by byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
