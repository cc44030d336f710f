"""Flax definitions of the model families; the math comes from `stagejax.models.ops`."""

from stagejax.models.decoder import Decoder, KVCache, init_kv_cache, write_kv_rows

__all__ = ["Decoder", "KVCache", "init_kv_cache", "init_params", "write_kv_rows"]


def init_params(config, seed: int = 0):
    """Random parameters of `config` (float32), deterministic in `seed`."""
    import jax
    import jax.numpy as jnp

    model = Decoder(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    # Jitted: op-by-op initialisation of even the tiny model takes seconds.
    return jax.jit(model.init)(jax.random.PRNGKey(seed), tokens)["params"]
