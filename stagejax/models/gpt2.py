"""The GPT-2 family: LayerNorm, learned positions, multi-head attention, a GELU MLP, biases
everywhere, the head tied to the token embedding."""

from stagejax.models.family import Family


def _check(config) -> None:
    if config.n_kv_heads != config.n_heads:
        raise ValueError("GPT-2 has no grouped-query attention: n_kv_heads must equal n_heads")
    if config.n_heads * config.head_dim != config.d_model:
        raise ValueError("GPT-2 needs n_heads * head_dim == d_model")
    if not config.tie_embeddings:
        raise ValueError("GPT-2 ties its LM head to the token embedding")


FAMILY = Family(name="gpt2", norm="layer", biases=True, rope=False, ffn="gelu_mlp", check=_check)
