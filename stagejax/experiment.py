"""One run of the main job: load, compile, generate, evaluate perplexity, write metrics.json.

`run_experiment(settings, out_dir)` is what `python -m stagejax.run` calls after composing its
hydra config; it is equally usable from Python. Metric names follow design §7.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from stagejax import data, measure
from stagejax.decode import decoder_for, generate, token_nll
from stagejax.loading import open_model
from stagejax.perplexity import perplexity_llama_cpp, perplexity_strided
from stagejax.results import atomic_write_json
from stagejax.sampling import SamplingConfig
from stagejax.settings import RunSettings


def prompt_ids(tokenizer, settings: RunSettings) -> list[int]:
    prompt = settings.decode.prompt
    if settings.decode.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def run_experiment(settings: RunSettings, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the configured job and write `metrics.json` (atomically) into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peak = measure.PeakRss()
    wall_start = time.perf_counter()

    handle = open_model(settings.model.name, settings.model.path, settings.seed)
    config = handle.config
    ids = prompt_ids(handle.tokenizer, settings)
    sampling = SamplingConfig(settings.decode.temperature, settings.decode.top_k, settings.decode.top_p)
    params_spec = handle.abstract_params()

    # Compile every executable from abstract shapes before any weight is loaded, so the
    # baseline RSS is the runtime's own cost (design §7).
    compile_start = time.perf_counter()
    decoder = decoder_for(config, params_spec, len(ids), settings.decode.max_new_tokens, sampling)
    n_ctx = settings.eval.n_ctx
    if n_ctx > config.max_seq_len:
        raise ValueError(f"eval.n_ctx={n_ctx} exceeds the model's context of {config.max_seq_len}")
    nll_executable = None
    if settings.eval.ppl_chunks:
        nll_executable = jax.jit(lambda p, t: token_nll(config, p, t)).lower(
            params_spec, jax.ShapeDtypeStruct((1, n_ctx), jnp.int32)).compile()
    compile_s = time.perf_counter() - compile_start
    baseline_rss = measure.rss_bytes()

    params = handle.load_params()
    jax.block_until_ready(params)
    warmup_s = decoder.warm_up(params)

    peak.start_phase()
    generation = generate(config, params, ids, settings.decode.max_new_tokens, sampling,
                          settings.seed, config.eos_token_id, decoder,
                          detokenize=handle.tokenizer.decode)
    peak_decode = peak.phase_peak_bytes()

    metrics = {
        "model": settings.model.name,
        "schedule": settings.schedule.policy,
        "quant": settings.quant.scheme,
        "cache": settings.cache.kind,
        "baseline_rss_bytes": baseline_rss,
        "peak_rss_decode_bytes": peak_decode - baseline_rss,
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "decode_tokens_per_s": generation.decode_tokens_per_s,
        "prefill_tokens_per_s": generation.prefill_tokens_per_s,
        "time_to_first_token_s": generation.time_to_first_token_s,
        "n_decode_steps": generation.n_decode_steps,
        "prompt_tokens": len(ids),
        "generated_tokens": len(generation.new_ids),
        "generated_text": generation.text,
        "param_bytes": int(sum(np.prod(a.shape) * a.dtype.itemsize
                               for a in jax.tree_util.tree_leaves(params))),
    }

    if settings.eval.ppl_chunks:
        text = data.read_text(settings.eval.dataset, settings.paths.data)
        tokens = handle.tokenizer.encode(text)
        nll_fn = lambda window: nll_executable(params, jnp.asarray(window))
        if settings.eval.procedure == "llama_cpp":
            result = perplexity_llama_cpp(nll_fn, tokens, n_ctx, settings.eval.ppl_chunks, progress)
        else:
            strided_fn = jax.jit(lambda p, t: token_nll(config, p, t))
            result = perplexity_strided(lambda w: strided_fn(params, jnp.asarray(w)), tokens, n_ctx,
                                        settings.eval.stride, settings.eval.ppl_chunks, progress)
        metrics.update(ppl=result.ppl, ppl_stderr=result.ppl_stderr, ppl_chunks=result.n_chunks,
                       n_ctx=n_ctx, ppl_procedure=result.procedure,
                       ppl_scored_tokens=result.n_scored_tokens)

    metrics["peak_rss_bytes"] = max(peak.overall_bytes, measure.peak_rss_bytes())
    metrics["wall_s"] = time.perf_counter() - wall_start
    atomic_write_json(out_dir / "resolved_settings.json", dataclasses.asdict(settings))
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def format_summary(metrics: dict) -> str:
    """A short human-readable summary of a run's metrics."""
    mb = lambda b: f"{b / 2**20:,.1f} MB"
    lines = [
        f"model {metrics['model']}  schedule {metrics['schedule']}  quant {metrics['quant']}  "
        f"cache {metrics['cache']}",
        f"generated: {json.dumps(metrics['generated_text'])}",
        f"peak RSS {mb(metrics['peak_rss_bytes'])} (runtime baseline {mb(metrics['baseline_rss_bytes'])}, "
        f"decode above baseline {mb(metrics['peak_rss_decode_bytes'])})",
        f"decode {metrics['decode_tokens_per_s']:.2f} tokens/s, prefill "
        f"{metrics['prefill_tokens_per_s']:.1f} tokens/s, time to first token "
        f"{metrics['time_to_first_token_s'] * 1e3:.1f} ms, compile {metrics['compile_s']:.1f} s",
    ]
    if "ppl" in metrics:
        lines.append(f"perplexity {metrics['ppl']:.4f} +/- {metrics['ppl_stderr']:.4f} "
                     f"({metrics['ppl_chunks']} chunks of {metrics['n_ctx']} tokens, "
                     f"{metrics['ppl_procedure']})")
    return "\n".join(lines)
