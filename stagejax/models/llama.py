"""The Llama family (SmolLM2 is one): RMSNorm, RoPE, grouped-query attention, SwiGLU, no
biases, a tied or untied head."""

from stagejax.models.family import Family


def _check(config) -> None:
    if config.head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {config.head_dim}")


FAMILY = Family(name="llama", norm="rms", biases=False, rope=True, ffn="swiglu", check=_check)
