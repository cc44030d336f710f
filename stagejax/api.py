"""The public Python API: load a model, generate text, evaluate perplexity.

The CLI (`python -m stagejax.run`) is built from the same pieces; these functions are the
shortest path from Python:

    import stagejax
    model = stagejax.load_model("smollm2_135m")
    print(stagejax.generate(model, "The capital of France is", max_new_tokens=16).text)
    print(stagejax.generate(model, "The capital of France is", schedule="layer").text)
    print(stagejax.perplexity(model, n_chunks=4).ppl)

Any plan runs through the same engine protocol as the main job's (`stagejax.engine`): the
default `model` plan on the parameters already loaded, any other schedule streaming the
weights from the model's stage-shard checkpoint (converted once into the cache, then reused).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

from stagejax import data
from stagejax.decode import GenerationResult, generate as generate_ids, run_generation, token_nll
from stagejax.loading import Model, ModelHandle, load_model
from stagejax.evaluation import PerplexityResult, perplexity_llama_cpp, perplexity_strided
from stagejax.sampling import SamplingConfig
from stagejax.settings import (DecodeSettings, EvalSettings, ModelSettings, PathSettings,
                               QuantSettings, RunSettings, ScheduleSettings)

__all__ = ["Model", "load_model", "generate", "perplexity"]


def generate(model: Model, prompt: str | list[int], max_new_tokens: int = 32, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             chat: bool = False, schedule: str | ScheduleSettings = "model", quant: str = "none",
             budget_mb: float | None = None, cache_dir: str | None = None) -> GenerationResult:
    """Continue `prompt` (text or token ids); greedy unless `temperature` > 0.

    `chat=True` wraps a text prompt as one user message in the model's chat template.
    Generation stops at the model's end-of-sequence token.

    `schedule`: the plan — a policy (atomic, op, layer, model, budget, similar_size, optimal)
    or full `ScheduleSettings` (chunks, KV block, prefetch depth, ...); `budget_mb` for the
    budget policies. The default `model` with `quant="none"` runs on the loaded parameters;
    anything else streams the stage shards of the model stored as `quant` (a scheme of
    `stagejax.quant.SCHEMES`) from `cache_dir` (default: $STAGEJAX_CACHE or ~/.cache/stagejax).
    """
    if isinstance(prompt, str):
        if chat:
            prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        prompt = model.tokenizer.encode(prompt)
    prompt = list(prompt)
    sampling = SamplingConfig(temperature, top_k, top_p)
    settings = _settings(model, schedule, quant, budget_mb, cache_dir, max_new_tokens=max_new_tokens)
    if _on_loaded_params(settings):
        return generate_ids(model.config, model.params, prompt, max_new_tokens, sampling, seed,
                            model.config.eos_token_id, detokenize=model.tokenizer.decode)
    capacity = len(prompt) + max_new_tokens + 1
    with _schedule_run(model, settings, capacity, len(prompt), sampling) as run:
        return run_generation(run.engine, prompt, max_new_tokens, seed, model.config.eos_token_id,
                              model.tokenizer.decode, run.compile_s)


def _settings(model: Model, schedule, quant: str, budget_mb, cache_dir, *, ppl_chunks: int = 0,
              n_ctx: int | None = None, max_new_tokens: int = 32) -> RunSettings:
    if isinstance(schedule, str):
        schedule = ScheduleSettings(policy=schedule, budget_mb=budget_mb)
    elif budget_mb is not None:
        schedule = dataclasses.replace(schedule, budget_mb=budget_mb)
    return RunSettings(model=ModelSettings(model.name, model.source_path), schedule=schedule,
                       quant=QuantSettings(scheme=quant), paths=PathSettings(cache=cache_dir),
                       eval=EvalSettings(ppl_chunks=ppl_chunks, n_ctx=n_ctx),
                       decode=DecodeSettings(max_new_tokens=max_new_tokens))


def _on_loaded_params(settings: RunSettings) -> bool:
    """The resident plan of an unquantized model: its weights are the parameters already loaded."""
    return settings.schedule.policy == "model" and settings.quant.scheme == "none"


@contextlib.contextmanager
def _schedule_run(model: Model, settings: RunSettings, capacity: int, prompt_len: int,
                  sampling: SamplingConfig):
    """The planned, compiled and loaded run of `settings` over the model's stage shards."""
    from stagejax.engine import ScheduleRun
    from stagejax.store import WeightStore, convert_checkpoint

    handle = ModelHandle(model.name, model.config, model.tokenizer, model.source_format,
                         model.source_path, lambda: model.params)
    schedule = settings.schedule
    checkpoint = convert_checkpoint(handle, settings.paths.cache, schedule.ffn_chunks,
                                    schedule.vocab_chunk, settings.quant.scheme, progress=False)
    store = WeightStore(checkpoint, verify=settings.store.verify, expect_config=model.config)
    try:
        run = ScheduleRun(settings, handle, store, capacity, prompt_len, sampling)
        try:
            run.engine.load()
            yield run
        finally:
            run.close()
    finally:
        store.close()


def perplexity(model: Model, text: str | None = None, n_ctx: int | None = None,
               n_chunks: int | None = None, procedure: str = "llama_cpp", stride: int = 256,
               progress: bool = True, text_mode: str = "bytes", *,
               schedule: str | ScheduleSettings = "model", quant: str = "none",
               budget_mb: float | None = None, cache_dir: str | None = None) -> PerplexityResult:
    """Perplexity of `text` (default: WikiText-2 raw test split, read as `text_mode` says:
    `stagejax.data.read_text`) by llama.cpp's procedure, or Hugging Face's strided one with
    `procedure="strided"`. `n_ctx` None: 512, or the model's context where shorter.
    `schedule`, `quant`, `budget_mb`, `cache_dir`: the plan that scores, as for `generate`."""
    if procedure not in ("llama_cpp", "strided"):
        raise ValueError(f"procedure must be 'llama_cpp' or 'strided', got {procedure!r}")
    n_ctx = EvalSettings(n_ctx=n_ctx).context(model.config.max_seq_len)
    if text is None:
        text = data.read_text("wikitext-2/wiki.test.raw", text_mode=text_mode)
    tokens = model.tokenizer.encode(text)

    def score(nll_fn):
        if procedure == "llama_cpp":
            return perplexity_llama_cpp(nll_fn, tokens, n_ctx, n_chunks, progress)
        return perplexity_strided(nll_fn, tokens, n_ctx, stride, n_chunks, progress)

    settings = _settings(model, schedule, quant, budget_mb, cache_dir, ppl_chunks=n_chunks or 1,
                         n_ctx=n_ctx, max_new_tokens=1)
    if _on_loaded_params(settings):
        nll = jax.jit(functools.partial(token_nll, model.config))
        return score(lambda window: nll(model.params, jnp.asarray(window)))
    with _schedule_run(model, settings, n_ctx, 1, SamplingConfig()) as run:
        return score(run.nll_fn())
