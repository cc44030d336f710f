"""The README's Python example works as written (on the tiny model, for speed)."""

import stagejax


def test_api_generate_and_perplexity():
    model = stagejax.load_model("tiny")
    result = stagejax.generate(model, "Hello", max_new_tokens=6)
    assert len(result.new_ids) == 6 and isinstance(result.text, str)
    sampled = stagejax.generate(model, "Hello", max_new_tokens=6, temperature=1.0, seed=3)
    again = stagejax.generate(model, "Hello", max_new_tokens=6, temperature=1.0, seed=3)
    assert sampled.new_ids == again.new_ids
    text = "A line of text for the tiny model to score. " * 20
    llama = stagejax.perplexity(model, text, n_ctx=64, n_chunks=2, progress=False)
    strided = stagejax.perplexity(model, text, n_ctx=64, procedure="strided", stride=32,
                                  progress=False)
    assert llama.n_chunks == 2 and llama.n_scored_tokens == 2 * 31
    assert strided.n_scored_tokens == len(model.tokenizer.encode(text)) - 1
    assert 1 < llama.ppl < 1e4 and 1 < strided.ppl < 1e4
