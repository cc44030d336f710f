"""Mixture-of-experts layers (`stagejax.models.moe`, `Block.experts`): top-K routing, the
dropless gathered experts against a dense computation, the load-balancing loss, dense as
E = K = 1, the cache path, and the staged path's refusal."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stagejax.model_config import ModelConfig
from stagejax.models import Decoder, moe, ops
from stagejax.models.decoder import init_kv_cache
from stagejax.stages import ChunkLayout, build_stages

MOE = ModelConfig(family="llama", vocab_size=61, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2,
                  head_dim=6, ffn_dim=20, max_seq_len=32, norm_eps=1e-5, n_experts=5,
                  experts_per_token=2)


def expert_weights(n_experts, d, f, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(keys[0], (n_experts, d, f)) / np.sqrt(d),
            jax.random.normal(keys[1], (n_experts, d, f)) / np.sqrt(d),
            jax.random.normal(keys[2], (n_experts, f, d)) / np.sqrt(f))


# jitted: op-by-op, each small op compiles on first use (seconds per test)
route = jax.jit(moe.route, static_argnums=1)
expert_swiglu = jax.jit(moe.expert_swiglu, static_argnames="block_rows")


@jax.jit
def dense_reference(x_TD, experts_TK, gates_TK, w_gate, w_up, w_down):
    """Every expert on every token (the dense computation), then each token's routed ones."""
    all_TED = jnp.stack([ops.swiglu(x_TD[None], w_gate[e], w_up[e], w_down[e])[0]
                         for e in range(w_gate.shape[0])], axis=1)
    picked_TKD = jnp.take_along_axis(all_TED, experts_TK[:, :, None], axis=1)
    return jnp.sum(gates_TK[:, :, None] * picked_TKD, axis=1)


@pytest.mark.parametrize("tokens,k,block_rows", [(1, 3, None), (37, 2, None), (37, 1, 8),
                                                 (200, 3, 64)])
def test_tokens_go_to_exactly_k_experts_and_equal_the_dense_computation(tokens, k, block_rows):
    n_experts, d, f = 6, 16, 12
    x = jax.random.normal(jax.random.PRNGKey(tokens), (tokens, d))
    logits = jax.random.normal(jax.random.PRNGKey(tokens + 1), (tokens, n_experts)) * 2
    experts, gates, probs = route(logits, k)
    # exactly K distinct experts per token, the most probable ones, weighted by their probabilities
    assert experts.shape == (tokens, k)
    assert all(len(set(row)) == k for row in np.asarray(experts).tolist())
    kth = np.sort(np.asarray(probs), axis=1)[:, -k]
    assert np.all(np.asarray(gates) >= kth[:, None] - 1e-7)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(probs), np.asarray(experts), 1),
                                  np.asarray(gates))
    weights = expert_weights(n_experts, d, f)
    y = expert_swiglu(x, experts, gates, *weights, block_rows=block_rows)
    np.testing.assert_allclose(y, dense_reference(x, experts, gates, *weights), rtol=2e-5, atol=2e-5)
    # only the routed experts' weights matter: an expert no token chose can be anything
    unused = sorted(set(range(n_experts)) - set(np.asarray(experts).ravel().tolist()))
    if unused:
        changed = tuple(w.at[unused[0]].set(7.0) for w in weights)
        np.testing.assert_array_equal(expert_swiglu(x, experts, gates, *changed, block_rows=block_rows), y)
    used = int(experts[0, 0])
    changed = tuple(w.at[used].multiply(1.5) for w in weights)
    assert not np.allclose(expert_swiglu(x, experts, gates, *changed, block_rows=block_rows), y)


def test_one_expert_per_token_of_one_is_the_dense_ffn():
    """The routing machinery with E = K = 1: gate 1, every token through the one expert."""
    x = jax.random.normal(jax.random.PRNGKey(0), (48, 16))
    w_gate, w_up, w_down = expert_weights(1, 16, 24)
    experts, gates, _ = route(jnp.zeros((48, 1)), 1)
    assert np.all(np.asarray(gates) == 1.0) and np.all(np.asarray(experts) == 0)
    np.testing.assert_allclose(expert_swiglu(x, experts, gates, w_gate, w_up, w_down),
                               jax.jit(ops.swiglu)(x[None], w_gate[0], w_up[0], w_down[0])[0],
                               rtol=1e-6, atol=1e-6)


def test_dense_model_is_the_one_expert_model_bit_for_bit():
    """E = K = 1 is the dense model: the same parameters, no router, bit-identical logits and
    gradients, no load-balancing term."""
    dense = dataclasses.replace(MOE, n_experts=1, experts_per_token=1)
    plain = ModelConfig(**{k: v for k, v in dense.to_dict().items()})
    assert plain == dense and "n_experts" not in dense.to_dict()  # manifests read as before
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 11)), jnp.int32)
    params = jax.jit(Decoder(plain).init)(jax.random.PRNGKey(0), tokens)["params"]
    assert "router" not in params["L0"] and params["L0"]["gate"]["kernel"].shape == (24, 20)

    def loss(config, p):
        (logits, _), sown = Decoder(config).apply({"params": p}, tokens, mutable=["intermediates"])
        return jnp.sum(logits), sown

    grad = jax.jit(jax.value_and_grad(loss, argnums=1, has_aux=True), static_argnums=0)
    (a, sown), grads_a = grad(dense, params)
    (b, _), grads_b = grad(plain, params)
    assert float(a) == float(b) and not sown
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)))


def test_load_balancing_loss_is_minimal_for_uniform_routing():
    n_experts, k = 4, 1
    # balanced, uniform: every expert gets a quarter of the tokens and equal probability
    uniform = moe.load_balancing_loss(jnp.full((8, n_experts), 0.25),
                                      jnp.arange(8, dtype=jnp.int32)[:, None] % n_experts)
    assert float(uniform) == pytest.approx(1.0)
    # every token to expert 0 with certainty: E
    collapsed = moe.load_balancing_loss(jax.nn.one_hot(jnp.zeros(8, jnp.int32), n_experts),
                                        jnp.zeros((8, k), jnp.int32))
    assert float(collapsed) == pytest.approx(n_experts)
    # routing that follows the probabilities in expectation (f = P): E * sum P^2 >= 1
    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0, 3.0):
        probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(4000, n_experts)) * scale
                                           + rng.normal(size=n_experts) * scale), axis=-1)
        experts, _, _ = route(jnp.log(probs), k)
        assigned = np.bincount(np.asarray(experts).ravel(), minlength=n_experts) / 4000
        mean_p = np.asarray(probs).mean(0)
        assert n_experts * np.sum(mean_p ** 2) > 1.0
        value = float(moe.load_balancing_loss(probs, experts))
        assert value == pytest.approx(n_experts * np.sum(assigned * mean_p), rel=1e-5)
        assert value > float(uniform)


def test_moe_prefill_and_step_equal_the_full_forward():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 61, (1, 12)), jnp.int32)
    model = Decoder(MOE)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), tokens)["params"]
    assert params["L0"]["router"]["kernel"].shape == (24, 5)
    assert params["L0"]["down"]["kernel"].shape == (5, 20, 24)
    apply = jax.jit(lambda p, t, cache, start: model.apply({"params": p}, t, kv_cache=cache, start=start))
    full, _ = jax.jit(model.apply)({"params": params}, tokens)
    first, cache = apply(params, tokens[:, :9], init_kv_cache(MOE, 1, 16), 0)
    rest = []
    for i in range(9, 12):
        logits, cache = apply(params, tokens[:, i:i + 1], cache, i)
        rest.append(logits)
    np.testing.assert_allclose(jnp.concatenate([first] + rest, axis=1), full, rtol=1e-4, atol=1e-4)


def test_staged_path_refuses_mixture_of_experts_with_a_clear_error():
    with pytest.raises(ValueError, match="5 experts per layer.*monolithically"):
        build_stages(MOE, ChunkLayout.create(MOE))
    with pytest.raises(ValueError, match="experts_per_token \\(3\\) exceeds n_experts \\(2\\)"):
        dataclasses.replace(MOE, n_experts=2, experts_per_token=3)
