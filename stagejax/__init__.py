"""stagejax: memory-scheduled (staged) decoding of language models in JAX.

Public API: `load_model`, `generate`, `perplexity` (see `stagejax.api`).
"""

from stagejax.api import Model, generate, load_model, perplexity

__all__ = ["Model", "load_model", "generate", "perplexity"]
