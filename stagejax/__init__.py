"""stagejax: memory-scheduled (staged) decoding of language models in JAX."""
