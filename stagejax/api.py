"""The public Python API: load a model, generate text, evaluate perplexity.

The CLI (`python -m stagejax.run`) is built from the same pieces; these functions are the
shortest path from Python:

    import stagejax
    model = stagejax.load_model("smollm2_135m")
    print(stagejax.generate(model, "The capital of France is", max_new_tokens=16).text)
    print(stagejax.perplexity(model, n_chunks=4).ppl)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stagejax import data
from stagejax.decode import GenerationResult, generate as generate_ids, token_nll
from stagejax.loading import Model, load_model
from stagejax.evaluation import PerplexityResult, perplexity_llama_cpp, perplexity_strided
from stagejax.sampling import SamplingConfig
from stagejax.settings import EvalSettings

__all__ = ["Model", "load_model", "generate", "perplexity"]


def generate(model: Model, prompt: str | list[int], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             chat: bool = False) -> GenerationResult:
    """Continue `prompt` (text or token ids); greedy unless `temperature` > 0.

    `chat=True` wraps a text prompt as one user message in the model's chat template.
    Generation stops at the model's end-of-sequence token.
    """
    if isinstance(prompt, str):
        if chat:
            prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = model.tokenizer.encode(prompt)
    return generate_ids(model.config, model.params, list(prompt), max_new_tokens,
                        SamplingConfig(temperature, top_k, top_p), seed,
                        model.config.eos_token_id, detokenize=model.tokenizer.decode)


def perplexity(model: Model, text: str | None = None, n_ctx: int | None = None,
               n_chunks: int | None = None, procedure: str = "llama_cpp", stride: int = 256,
               progress: bool = True, text_mode: str = "bytes") -> PerplexityResult:
    """Perplexity of `text` (default: WikiText-2 raw test split, read as `text_mode` says:
    `stagejax.data.read_text`) by llama.cpp's procedure, or Hugging Face's strided one with
    `procedure="strided"`. `n_ctx` None: 512, or the model's context where shorter."""
    n_ctx = EvalSettings(n_ctx=n_ctx).context(model.config.max_seq_len)
    if text is None:
        text = data.read_text("wikitext-2/wiki.test.raw", text_mode=text_mode)
    tokens = model.tokenizer.encode(text)
    nll = jax.jit(functools.partial(token_nll, model.config))
    nll_fn = lambda window: nll(model.params, jnp.asarray(window))
    if procedure == "llama_cpp":
        return perplexity_llama_cpp(nll_fn, tokens, n_ctx, n_chunks, progress)
    if procedure == "strided":
        return perplexity_strided(nll_fn, tokens, n_ctx, stride, n_chunks, progress)
    raise ValueError(f"procedure must be 'llama_cpp' or 'strided', got {procedure!r}")
