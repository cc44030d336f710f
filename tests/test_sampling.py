import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stagejax.sampling import SamplingConfig, filter_logits, sample_token


def test_greedy_is_argmax():
    logits = jnp.asarray([0.1, 3.0, -2.0, 2.9])
    assert int(sample_token(logits, jax.random.PRNGKey(0), SamplingConfig())) == 1


def test_top_k_keeps_only_k_largest():
    logits = jnp.asarray([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2, top_p=1.0)))
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    kept = np.isfinite(np.asarray(filter_logits(jnp.log(jnp.asarray(probs)), top_k=0, top_p=0.7)))
    assert kept.tolist() == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 reaches it


def test_sampling_follows_the_distribution_and_is_seeded():
    logits = jnp.log(jnp.asarray([0.6, 0.3, 0.1]))
    config = SamplingConfig(temperature=1.0)
    draw = jax.jit(jax.vmap(lambda key: sample_token(logits, key, config)))
    samples = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 20000)))
    freq = np.bincount(samples, minlength=3) / len(samples)
    np.testing.assert_allclose(freq, [0.6, 0.3, 0.1], atol=0.015)
    again = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 20000)))
    assert (samples == again).all()


def test_bad_sampling_values_are_refused():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
