"""stagejax: memory-scheduled (staged) decoding of language models in JAX.

Public API: `load_model`, `generate`, `perplexity` (see `stagejax.api`).
"""

__all__ = ["Model", "load_model", "generate", "perplexity"]


def __getattr__(name: str):
    # Lazy: `python -m stagejax.run` sets JAX_PLATFORMS and OPENBLAS_NUM_THREADS before jax and
    # numpy load; an eager import of the API here would load them first.
    if name in __all__:
        from stagejax import api

        return getattr(api, name)
    raise AttributeError(f"module 'stagejax' has no attribute {name!r}")
