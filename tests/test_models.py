"""The monolithic reference: cached prefill + step decode equals the full forward, both families."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stagejax.decode import MonolithicDecoder, forward_logits, generate
from stagejax.loading import load_model
from stagejax.model_config import ModelConfig, get_preset
from stagejax.models import Decoder, init_kv_cache

# float32 reassociation between the cached and cache-free attention orders.
ATOL = 1e-5

jit_forward = jax.jit(forward_logits, static_argnums=0)


def scaled_params(params, seed=1, scale=4.0):
    """Random weights large enough that every layer changes the logits noticeably."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, l.shape) * scale * 0.02 + (l == 1.0) for k, l in zip(keys, leaves)])


@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2", "tiny_qwen3"])
def test_prefill_plus_steps_equals_full_forward(name):
    model = load_model(name)
    params = scaled_params(model.params)
    config = model.config
    tokens = jax.random.randint(jax.random.PRNGKey(0), (1, 29), 0, config.vocab_size)
    full = jit_forward(config, params, tokens)
    decoder = MonolithicDecoder(config, params, cache_len=64, prefill_len=17)
    cache = decoder.new_cache()
    prompt = [int(t) for t in tokens[0, :11]]  # 11 real tokens, right-padded to 17
    logits, cache = decoder.prefill(params, prompt, cache)
    np.testing.assert_allclose(logits, full[0, 10], atol=ATOL)
    for position in range(11, 29):
        logits, cache = decoder.step(params, int(tokens[0, position]), position, cache)
        np.testing.assert_allclose(logits, full[0, position], atol=ATOL)


@pytest.mark.parametrize("name", ["tiny", "tiny_gpt2", "tiny_qwen3"])
def test_step_donates_the_cache(name):
    model = load_model(name)
    decoder = MonolithicDecoder(model.config, model.params, cache_len=64, prefill_len=8)
    cache = decoder.new_cache()
    _, new_cache = decoder.step(model.params, 3, 0, cache)
    assert all(a.is_deleted() for a in jax.tree_util.tree_leaves(cache))
    assert not any(a.is_deleted() for a in jax.tree_util.tree_leaves(new_cache))


def test_greedy_generation_matches_full_forward_argmax():
    model = load_model("tiny")
    params = scaled_params(model.params)
    prompt = [5, 17, 200, 3]
    result = generate(model.config, params, prompt, 12)
    sequence = list(prompt)
    for _ in range(12):
        # Right-padding to a fixed length is harmless under the causal mask: one compile.
        padded = np.zeros((1, 16), np.int32)
        padded[0, :len(sequence)] = sequence
        logits = jit_forward(model.config, params, jnp.asarray(padded))
        sequence.append(int(jnp.argmax(logits[0, len(sequence) - 1])))
    assert result.new_ids == sequence[len(prompt):]


def test_generation_stops_at_eos():
    model = load_model("tiny")
    params = scaled_params(model.params)
    free = generate(model.config, params, [5, 17], 12)
    eos = free.new_ids[3]
    spell = lambda ids: " ".join(f"<{i}>" for i in ids)  # noqa: E731
    stopped = generate(model.config, params, [5, 17], 12, eos_token_id=eos, detokenize=spell)
    first = free.new_ids.index(eos)
    assert stopped.new_ids == free.new_ids[:first + 1]
    assert stopped.stopped_at_eos
    # The end-of-sequence token ends the text instead of being spelled out in it.
    assert stopped.text == spell(free.new_ids[:first])


def test_prompt_longer_than_context_is_refused():
    model = load_model("tiny")
    with pytest.raises(ValueError, match="exceeds the model's context of 97"):
        generate(model.config, model.params, list(range(90)), 10)


def test_gqa_heads_attend_their_own_kv_group():
    """Zeroing the values of kv group 0 changes exactly the outputs of query heads 0..G-1."""
    from stagejax.models import ops

    b, t, k, g, h = 1, 5, 2, 3, 4
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(b, t, k * g, h)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
    mask = ops.causal_mask(jnp.arange(t)[None], jnp.arange(t)[None])
    out = ops.attention(q, keys, values, mask)
    out_zeroed = ops.attention(q, keys, values.at[:, :, 0].set(0), mask)
    changed = np.abs(np.asarray(out - out_zeroed)).max(axis=(0, 1, 3)) > 0
    assert changed.tolist() == [True] * g + [False] * g


def test_model_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelConfig("llama", 10, 8, 1, 3, 2, 4, 16, 32, 1e-5)
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        get_preset("nope")
