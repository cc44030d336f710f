"""The two perplexity procedures score exactly the tokens they document."""

import math

import numpy as np
import pytest

from stagejax import data
from stagejax.evaluation import perplexity_llama_cpp, perplexity_strided


def position_nll_fn(record):
    """An nll_fn whose value at each position is the absolute index of the predicted token."""
    def nll_fn(window_1T):
        record.append(window_1T[0].copy())
        return window_1T[:, 1:].astype(np.float64)
    return nll_fn


def test_llama_cpp_scores_second_half_of_each_chunk():
    tokens = np.arange(1000)  # token value == its position
    seen = []
    result = perplexity_llama_cpp(position_nll_fn(seen), tokens, n_ctx=10, n_chunks=3, progress=False)
    # Chunk c covers [10c, 10c + 10); logits at 5..8 predict tokens 6..9 of the chunk.
    expected = np.concatenate([np.arange(10 * c + 6, 10 * c + 10) for c in range(3)])
    assert result.n_scored_tokens == len(expected) == 12
    assert math.isclose(result.mean_nll, expected.mean())
    assert [w[0] for w in seen] == [0, 10, 20]
    std = np.sqrt((np.mean(expected ** 2.0) - expected.mean() ** 2) / (len(expected) - 1))
    assert math.isclose(result.ppl_stderr, result.ppl * std)


def test_llama_cpp_limits_chunks_to_the_text():
    result = perplexity_llama_cpp(position_nll_fn([]), np.arange(35), n_ctx=10, n_chunks=99, progress=False)
    assert result.n_chunks == 3
    with pytest.raises(ValueError, match="fewer than one chunk"):
        perplexity_llama_cpp(position_nll_fn([]), np.arange(5), n_ctx=10, progress=False)


def test_strided_scores_every_token_once():
    tokens = np.arange(103)
    result = perplexity_strided(position_nll_fn([]), tokens, n_ctx=20, stride=7, progress=False)
    assert result.n_scored_tokens == 102  # every token but the first, once
    assert math.isclose(result.mean_nll, np.arange(1, 103).mean())


def test_text_mode_says_whether_line_ends_are_kept(tmp_path):
    """wiki.test.raw has CRLF line ends: "bytes" (llama.cpp's -f, the default) keeps them,
    "text" reads the file as Python's text mode does."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "lines.txt").write_bytes(b"one\r\ntwo\rthree\n")
    assert data.read_text("corpus/lines.txt", tmp_path) == "one\r\ntwo\rthree\n"
    as_text = data.read_text("corpus/lines.txt", tmp_path, text_mode="text")
    assert as_text == "one\ntwo\nthree\n"
    assert as_text == open(tmp_path / "corpus" / "lines.txt").read()
    with pytest.raises(ValueError, match="text_mode must be one of"):
        data.read_text("corpus/lines.txt", tmp_path, text_mode="lines")


def test_text_read_in_chunks_is_the_same_text(tmp_path):
    """`iter_text` at every chunk size: CRLF and lone CR split between chunks, a multi-byte
    character split between chunks, both text modes; a changed evaluation file is refused
    before any text is read."""
    (tmp_path / "corpus").mkdir()
    raw = "a\r\nb\r\rc\u00e9\u2014d\r\n\U0001F600e\r".encode()
    (tmp_path / "corpus" / "mixed.txt").write_bytes(raw)
    for mode in data.TEXT_MODES:
        whole = data.read_text("corpus/mixed.txt", tmp_path, mode)
        assert whole == (raw.decode() if mode == "bytes" else open(tmp_path / "corpus" / "mixed.txt", encoding="utf-8").read())
        for size in range(1, len(raw) + 1):
            assert "".join(data.iter_text("corpus/mixed.txt", tmp_path, mode, chunk_bytes=size)) == whole
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_bytes(b" = Changed = \r\n")
    with pytest.raises(ValueError, match="sha256.*restore it"):
        data.iter_text("wikitext-2/wiki.test.raw", tmp_path)
