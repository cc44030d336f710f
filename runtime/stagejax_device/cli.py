"""`stagejax-device BUNDLE` (or `python -m stagejax_device`): decode, or score perplexity, with an
exported bundle on this machine, without JAX.

    stagejax-device BUNDLE --prompt "The capital of France is" --max-new-tokens 32
    stagejax-device BUNDLE --chat --prompt "What is gravity?"
    stagejax-device BUNDLE --ppl-chunks 4 --text wiki.test.raw        # llama.cpp procedure

Writes `metrics.json` (design §7's keys; `--out`, default the current directory) atomically,
with the whole process's memory first: `decode_peak_rss_bytes`, then the runtime's fixed cost
(`baseline_rss_bytes`, RSS after start-up, module load and a warm-up on zero weights, before
any weight is read) broken down by what was loaded (`rss_breakdown_bytes`), and the working set
above it. A bundle or checkpoint it cannot run is refused with the reason and what to do
(exit status 2).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from stagejax_device import measure  # standard library only: the first RSS reading is Python's

RSS_AT_START = measure.rss_bytes()
import numpy as np  # noqa: E402

RSS_AFTER_NUMPY = measure.rss_bytes()

from stagejax_device.bundle import Bundle, BundleError  # noqa: E402
from stagejax_device.manifest import CheckpointError  # noqa: E402
from stagejax_device.results import atomic_write_json  # noqa: E402

METRICS_SCHEMA_VERSION = 2


def _chat_prompt(plan: dict, prompt: str) -> str:
    template = (plan.get("tokenizer") or {}).get("chat_template")
    if not template:
        raise BundleError("this model has no chat template: run without --chat")
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise BundleError("--chat renders the model's Jinja chat template and needs jinja2 "
                          "(pip install jinja2)") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=[{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)


def perplexity(nll_fn, tokens: list[int], n_ctx: int, n_chunks: int) -> dict:
    """llama.cpp's `perplexity` procedure (stagejax.evaluation.perplexity_llama_cpp): chunks
    of `n_ctx` tokens from an empty cache, the second half of each scored."""
    available = len(tokens) // n_ctx
    if available == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than one chunk of n_ctx={n_ctx}")
    n_chunks = min(n_chunks, available)
    first = n_ctx // 2
    scored = []
    for chunk in range(n_chunks):
        window = tokens[chunk * n_ctx:(chunk + 1) * n_ctx]
        scored.append(np.asarray(nll_fn(window))[first:n_ctx - 1])
    nlls = np.concatenate(scored).astype(np.float64)
    mean = float(nlls.mean())
    ppl = math.exp(mean)
    variance = float(np.mean(nlls * nlls) - mean * mean)
    stderr = ppl * math.sqrt(variance / (len(nlls) - 1)) if variance > 0 and len(nlls) > 1 else 0.0
    return {"ppl": ppl, "ppl_stderr": stderr, "ppl_chunks": n_chunks, "n_ctx": n_ctx,
            "ppl_procedure": "llama_cpp", "ppl_scored_tokens": len(nlls)}


def run(args) -> dict:
    phases = measure.PhaseLog(args.out / measure.PHASE_FILE)
    phases.enter("open")
    peak = measure.PeakRss()
    wall_start = time.perf_counter()
    bundle = Bundle.open(args.bundle, args.checkpoint)
    plan = bundle.plan
    breakdown = {"python": RSS_AT_START, "numpy": RSS_AFTER_NUMPY}
    import iree.runtime  # noqa: F401  (its cost, measured apart)

    breakdown["iree"] = measure.rss_bytes()
    from stagejax_device.runner import StagedRunner
    from stagejax_device.tokenizer import Tokenizer

    tokenizer = Tokenizer(bundle.tokenizer_file)
    breakdown["tokenizer"] = measure.rss_bytes()
    phases.enter("load_module")
    start = time.perf_counter()
    runner = StagedRunner(bundle, driver=args.driver, verify=args.verify, reader=args.reader,
                          kv_directory=args.kv_dir)
    load_s = time.perf_counter() - start
    breakdown["module_and_buffers"] = measure.rss_bytes()
    try:
        text = _chat_prompt(plan, args.prompt) if args.chat else args.prompt
        ids = tokenizer.encode(text)
        capacity = runner.cache.capacity
        if len(ids) + args.max_new_tokens + 1 > capacity:
            raise BundleError(f"prompt of {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} "
                              f"exceeds the bundle's context of {capacity} tokens: shorten them, or "
                              "export with a larger export.context")
        keys = runner.sampling_keys(args.seed)
        phases.enter("warm_up")
        runner.dry_run()
        breakdown["warm_up"] = measure.rss_bytes()
        baseline = measure.rss_bytes()
        metrics = {
            "schema_version": METRICS_SCHEMA_VERSION, "engine": "stagejax-device (IREE)",
            "model": plan["model"]["name"], "schedule": plan["schedule"]["policy"], "quant": plan["quant"],
            "cache": plan["kv"]["location"] + {"float32": "", "bfloat16": "_bf16", "int8": "_int8"}[plan["kv"]["dtype"]],
            "cache_dtype": plan["kv"]["dtype"], "cache_order": plan["kv"]["order"],
            "n_stages": plan["schedule"]["n_stages"], "n_groups": plan["schedule"]["n_groups"],
            "n_executables": len(plan["functions"]), "planned_peak_bytes": plan["schedule"]["planned_peak_bytes"],
            "compile_s": 0.0, "module_load_s": load_s, "driver": args.driver,
            "target": plan["target"]["name"], "bundle": str(bundle.path),
        }
        if args.ppl_chunks:
            phases.enter("perplexity")
            data = Path(args.text).read_bytes().decode("utf-8")  # bytes as read: CRLF kept (llama.cpp's -f)
            metrics.update(perplexity(runner.token_nll, tokenizer.encode(data), args.n_ctx, args.ppl_chunks))
        else:
            phases.enter("prefill")
            metrics.update(generate(runner, tokenizer, ids, args, keys, peak, phases))
            metrics["baseline_rss_bytes"] = baseline
            metrics["decode_working_set_bytes"] = metrics["decode_peak_rss_bytes"] - baseline
            metrics["peak_rss_decode_bytes"] = metrics["decode_working_set_bytes"]
    finally:
        runner.close()
    metrics["rss_breakdown_bytes"] = {name: value for name, value in breakdown.items()}
    metrics["baseline_rss_bytes"] = baseline
    phases.enter("write")
    metrics["peak_rss_bytes"] = max(peak.overall_bytes, measure.peak_rss_bytes())
    metrics.update(measure.cgroup_memory() or {})
    metrics["wall_s"] = time.perf_counter() - wall_start
    atomic_write_json(args.out / "metrics.json", metrics)
    phases.enter("done")
    return metrics


def generate(runner, tokenizer, ids: list[int], args, keys, peak, phases) -> dict:
    """Prefill, then one step per new token until --max-new-tokens or the end-of-sequence token
    (which ends the text, not part of it)."""
    eos = tokenizer.eos_token_id
    store = runner.store
    start = time.perf_counter()
    token = runner.sample(runner.prefill(ids), keys[0])
    prefill_s = time.perf_counter() - start
    first_token_age_s = measure.process_age_s()
    new_ids = [token]
    runner.release_pass_buffers(keep_tokens=1)
    phases.enter("decode")
    peak.start_phase()
    bytes_start = store.bytes_read + runner.cache.bytes_read
    wait_start = store.io_wait_s + runner.kv_wait_s
    start = time.perf_counter()
    steps = 0
    while token != eos and len(new_ids) < args.max_new_tokens:
        token = runner.sample(runner.step(token, len(ids) + steps), keys[len(new_ids)])
        steps += 1
        new_ids.append(token)
    decode_s = time.perf_counter() - start
    decode_peak = peak.phase_peak_bytes()
    text_ids = new_ids[:-1] if new_ids and new_ids[-1] == eos else new_ids
    return {
        "decode_peak_rss_bytes": decode_peak,
        "decode_tokens_per_s": steps / decode_s if steps else None,
        "prefill_tokens_per_s": len(ids) / prefill_s, "time_to_first_token_s": prefill_s,
        "exec_to_first_token_s": first_token_age_s, "n_decode_steps": steps,
        "prompt_tokens": len(ids), "generated_tokens": len(new_ids), "generated_ids": new_ids,
        "stopped_at_eos": new_ids[-1] == eos, "generated_text": tokenizer.decode(text_ids),
        "io_wait_frac": (store.io_wait_s + runner.kv_wait_s - wait_start) / decode_s if decode_s else 0.0,
        "bytes_streamed_per_token": (store.bytes_read + runner.cache.bytes_read - bytes_start) / max(steps, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stagejax-device", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a bundle directory from python -m stagejax.export")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--temperature", type=float, help=argparse.SUPPRESS)  # fixed at export
    parser.add_argument("--seed", type=int, default=0, help="sampling keys (sampling is set at export)")
    parser.add_argument("--ppl-chunks", type=int, default=0, help="score perplexity on --text instead")
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--text", type=Path, help="--ppl-chunks: the text file (read as bytes)")
    parser.add_argument("--checkpoint", type=Path, help="stage shards elsewhere than the bundle says")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for metrics.json")
    parser.add_argument("--driver", default="local-sync", choices=("local-sync", "local-task"),
                        help="IREE driver: inline (default) or a worker pool")
    parser.add_argument("--verify", default="open", choices=("open", "read", "off"), help="shard checksums")
    parser.add_argument("--reader", default="auto", choices=("auto", "native", "python"))
    parser.add_argument("--kv-dir", help="where a disk KV cache keeps its files")
    args = parser.parse_args(argv)
    if args.temperature is not None:
        parser.error("sampling (temperature, top-k, top-p) is fixed when the bundle is exported "
                     "(decode.temperature=... on python -m stagejax.export)")
    if args.ppl_chunks and args.text is None:
        parser.error("--ppl-chunks needs --text FILE (e.g. ../shared/data/wikitext-2/wiki.test.raw)")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be at least 1")
    if not args.prompt and not args.ppl_chunks:
        parser.error("the prompt is empty: give --prompt some text")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        metrics = run(args)
    except (BundleError, CheckpointError, ValueError, FileNotFoundError) as error:
        print(f"stagejax-device: {error}", file=sys.stderr)
        return 2
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    if "ppl" in metrics:
        print(f"perplexity {metrics['ppl']:.4f} +/- {metrics['ppl_stderr']:.4f} ({metrics['ppl_chunks']} "
              f"chunks of {metrics['n_ctx']})")
    else:
        print(f"generated: {metrics['generated_text']!r}")
        print(f"decode peak RSS {mib(metrics['decode_peak_rss_bytes'])} for the whole process; runtime "
              f"baseline {mib(metrics['baseline_rss_bytes'])}, working set {mib(metrics['decode_working_set_bytes'])} "
              f"(planned {mib(metrics['planned_peak_bytes'])})")
        print(f"decode {metrics['decode_tokens_per_s'] or 0:.2f} tokens/s, first token "
              f"{metrics['exec_to_first_token_s']:.2f} s after start")
    print(f"metrics: {args.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
