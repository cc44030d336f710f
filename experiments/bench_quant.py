"""Every weight-storage scheme side by side on SmolLM2, context 512, in one run.

For each `quant` scheme, the main job (`stagejax.experiment.run_experiment`) runs in a fresh
process once per schedule, so every memory figure is its own:
  - `model` (weights resident, dequantized inside the step's jit): a ~480-token WikiText-2
    prompt, `--new-tokens` timed decode steps, then perplexity on the first `--ppl-chunks`
    chunks of wiki.test.raw (n_ctx 512, llama.cpp procedure) through the same stored weights;
  - `atomic` (every stage streams its weights as stored bytes): the same prompt and decode.
`--rounds` repeats every (scheme, schedule) run in interleaved rounds (each once, then again);
cells give the median over rounds. Reported per scheme: stored weight bytes, bytes streamed per
token (atomic), tokens/s (atomic, model), the whole process's peak RSS, the decode's working set
above the runtime baseline beside the plan's prediction (atomic), perplexity. `--matvec` adds the dequantize-then-dot formulations
measured on a 1536x576 matvec (what chose the stored layouts, see docs/quantization.md).

    .venv/bin/python experiments/bench_quant.py --rounds 2           # SmolLM2, all schemes
    .venv/bin/python experiments/bench_quant.py --matvec-only        # formulations only
    .venv/bin/python experiments/bench_quant.py --model tiny64 --schemes none,int8 \\
        --ppl-chunks 1 --new-tokens 4 --prompt-chars 200 --out /tmp/q  # a quick check

Results: `experiments/results/quant_smollm2/` (summary.md, summary.json, one directory per run
with metrics.json, plan.json, timeline.json), written atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SCHEMES = ("none", "gguf_native", "int8", "int4_g32", "int4_g64", "int4_g32_asym")
POLICIES = ("model", "atomic")


def settings_for(scheme: str, policy: str, args):
    from stagejax import data
    from stagejax.settings import (CacheSettings, DecodeSettings, EvalSettings, ModelSettings,
                                   QuantSettings, RunSettings, ScheduleSettings, StoreSettings,
                                   TrackingSettings)

    # Validation text for the prompt (the test split is for perplexity only).
    text = data.read_text("wikitext-2/wiki.valid.tokens")
    return RunSettings(
        model=ModelSettings(args.model, args.model_path),
        schedule=ScheduleSettings(policy=policy, ffn_chunks=args.ffn_chunks,
                                  vocab_chunk=args.vocab_chunk, kv_block=args.kv_block,
                                  prefetch_depth=args.prefetch_depth, prefill_block=64),
        quant=QuantSettings(scheme),
        cache=CacheSettings(kind="disk"),
        store=StoreSettings(verify="open"),
        eval=EvalSettings(ppl_chunks=args.ppl_chunks if policy == "model" else 0, n_ctx=args.n_ctx),
        decode=DecodeSettings(prompt=text[:args.prompt_chars], max_new_tokens=args.new_tokens),
        paths=_paths(args),
        tracking=TrackingSettings(mode="disabled"))


def _paths(args):
    from stagejax.settings import PathSettings

    return PathSettings(cache=args.cache)


def run_one(scheme: str, policy: str, out_dir: Path, args) -> None:
    from stagejax.experiment import run_experiment

    run_experiment(settings_for(scheme, policy, args), out_dir, progress=False)


# -- dequantize-then-dot formulations on one matvec ----------------------------------------------


def matvec_formulations(out_dim: int = 1536, in_dim: int = 576, rounds: int = 9,
                        calls: int = 100) -> list[dict]:
    """Per-call time of y = x @ W (x [1, in]) for each stored format and layout, jitted, weights
    resident. Rounds interleave the formulations so machine noise hits them alike; reported:
    the minimum (least disturbed) and the median over rounds, in µs."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from stagejax import quant

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    rng = np.random.default_rng(0)
    w_IO = rng.normal(0, 0.05, (in_dim, out_dim)).astype(np.float32)
    x = jnp.asarray(rng.normal(size=(1, in_dim)).astype(np.float32))
    i8 = quant.quantize_int8(w_IO)
    i4 = quant.quantize_int4(w_IO, 32)
    u4 = quant.quantize_int4(w_IO, 32, asym=True)
    import gguf

    def gguf_matrix(ggml_type):
        raw = gguf.quants.quantize(np.ascontiguousarray(w_IO.T), ggml_type)
        return quant.QuantizedMatrix(ggml_type.name.lower(), in_dim, out_dim, np.ascontiguousarray(raw.T)), raw

    q41, raw41 = gguf_matrix(gguf.GGMLQuantizationType.Q4_1)
    q80, raw80 = gguf_matrix(gguf.GGMLQuantizationType.Q8_0)
    G = 32

    def q4_out_major(x, packed_OB, scale_OG):  # int4 stored [out, in/2] (GGUF row order)
        o, groups = packed_OB.shape[0], scale_OG.shape[1]
        p = packed_OB.reshape(o, groups, G // 2)
        q = jnp.concatenate([p & 15, p >> 4], -1).astype(jnp.float32) - 8
        return x @ (q * scale_OG.astype(jnp.float32)[..., None]).reshape(o, -1).T

    def q41_rows(x, raw_OB):  # GGUF's blocks as stored: one output channel's blocks per row
        o = raw_OB.shape[0]
        b = raw_OB.reshape(o, -1, 20)
        dm = jax.lax.bitcast_convert_type(b[:, :, :4].reshape(o, -1, 2, 2), jnp.float16).astype(jnp.float32)
        q = jnp.concatenate([b[:, :, 4:] & 15, b[:, :, 4:] >> 4], -1).astype(jnp.float32)
        return x @ (q * dm[..., :1] + dm[..., 1:]).reshape(o, -1).T

    def q80_rows(x, raw_OB):
        o = raw_OB.shape[0]
        b = raw_OB.reshape(o, -1, 34)
        d = jax.lax.bitcast_convert_type(b[:, :, :2], jnp.float16).astype(jnp.float32)
        q = jax.lax.bitcast_convert_type(b[:, :, 2:], jnp.int8).astype(jnp.float32)
        return x @ (q * d[..., None]).reshape(o, -1).T

    dense = lambda x, m: x @ m.dequantize()  # noqa: E731  what the stages and the model run
    i4_rows = (np.ascontiguousarray(i4.data.T), np.ascontiguousarray(i4.scale.T))
    cases = [
        ("float32 [in, out]", "none", lambda x, w: x @ w, (w_IO,)),
        ("float32 [out, in]", "none (other layout)", lambda x, w: x @ w.T, (np.ascontiguousarray(w_IO.T),)),
        ("int8 [out, in], dequantize then dot", "int8 (stored)", dense, (i8,)),
        ("int8 [out, in], dot then scale", "int8 (alternative)",
         lambda x, q, s: (x @ q.astype(jnp.float32).T) * s, (i8.data, i8.scale)),
        ("int8 [in, out], dequantize then dot", "int8 (other layout)",
         lambda x, q, s: x @ (q.astype(jnp.float32) * s), (np.ascontiguousarray(i8.data.T), i8.scale)),
        ("int4 g32 [in/2, out], dequantize then dot", "int4_g32 (stored)", dense, (i4,)),
        ("int4 g32 asym [in/2, out], dequantize then dot", "int4_g32_asym (stored)", dense, (u4,)),
        ("int4 g32 [out, in/2], dequantize then dot", "int4 (other layout)", q4_out_major, i4_rows),
        ("Q4_1 blocks [in/32*20, out], dequantize then dot", "gguf_native (stored)", dense, (q41,)),
        ("Q4_1 blocks [out, in/32*20] (file order)", "gguf_native (file layout)", q41_rows, (raw41,)),
        ("Q8_0 blocks [in/32*34, out], dequantize then dot", "gguf_native (stored)", dense, (q80,)),
        ("Q8_0 blocks [out, in/32*34] (file order)", "gguf_native (file layout)", q80_rows, (raw80,)),
    ]
    compiled = []
    for name, role, fn, args in cases:
        f = jax.jit(fn)
        args = jax.tree_util.tree_map(jnp.asarray, args)
        jax.block_until_ready(f(x, *args))
        compiled.append((name, role, f, args))
    times = {name: [] for name, *_ in compiled}
    for _ in range(rounds):
        for name, _, f, args in compiled:
            start = time.perf_counter()
            for _ in range(calls):
                y = f(x, *args)
            y.block_until_ready()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return [{"formulation": name, "role": role, "min_us": float(np.min(times[name])),
             "median_us": float(np.median(times[name]))} for name, role, *_ in compiled]


def matvec_table(rows: list[dict]) -> list[str]:
    base = rows[0]["min_us"]
    lines = ["| formulation (1536x576 matvec, jitted) | use | min µs | median µs | min / float32 |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {r['formulation']} | {r['role']} | {r['min_us']:.1f} | {r['median_us']:.1f} | "
              f"{r['min_us'] / base:.2f} |" for r in rows]
    return lines


# -- the runs ------------------------------------------------------------------------------------


def median_run(runs: list[dict]) -> dict:
    """One row from rounds of the same run: the median of each number (rounds in `*_rounds`)."""
    import statistics

    merged = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
            merged[key] = statistics.median(values)
            merged[key + "_rounds"] = values
    return merged


def summarize(rows: dict, args, matvec: list[dict] | None) -> tuple[str, dict]:
    lines = [
        f"{args.model}, context {args.n_ctx} (a WikiText-2 prompt of "
        f"{round(next(iter(rows.values()))['model']['prompt_tokens']) if rows else '?'} tokens + "
        f"{args.new_tokens} decode steps), KV on disk (kv_block {args.kv_block}), ffn_chunks "
        f"{args.ffn_chunks}, vocab_chunk {args.vocab_chunk}, prefetch depth {args.prefetch_depth}; "
        f"perplexity: first {args.ppl_chunks} chunks of wiki.test.raw through `model` with the "
        f"stored weights. Each run in a fresh process, {args.rounds} interleaved round(s); cells "
        "are medians over rounds (MB = 2^20 bytes). Whole process: the peak RSS while decoding "
        "(`model`'s whole-run peak, its perplexity phase included, is in summary.json). "
        "Working set: the decode's peak above the "
        "runtime baseline (`decode_working_set_bytes`), beside the plan's prediction for atomic "
        "(dequantized temporaries and XLA's temporaries charged).", "",
        "| quant | stored MB | MB streamed/token (atomic) | tokens/s atomic | tokens/s model | "
        "whole process while decoding MB atomic | … model | working set MB atomic (planned) | "
        "working set MB model | PPL | ± |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    settings = dict(vars(args))
    if Path(settings["out"]).resolve().is_relative_to(REPO):  # no machine paths in results
        settings["out"] = str(Path(settings["out"]).resolve().relative_to(REPO))
    summary = {"settings": settings, "runs": rows}
    none_ppl = rows.get("none", {}).get("model", {}).get("ppl")
    for scheme, by in rows.items():
        a, m = by.get("atomic", {}), by.get("model", {})
        get = lambda r, k, scale=1.0, fmt="{:.2f}": (fmt.format(r[k] * scale) if k in r else "–")  # noqa: E731
        lines.append(
            f"| {scheme} | {get(m or a, 'weight_bytes', 2**-20, '{:.1f}')} | "
            f"{get(a, 'bytes_streamed_per_token', 2**-20, '{:.1f}')} | {get(a, 'decode_tokens_per_s')} | "
            f"{get(m, 'decode_tokens_per_s')} | {get(a, 'decode_peak_rss_bytes', 2**-20, '{:.1f}')} | "
            f"{get(m, 'decode_peak_rss_bytes', 2**-20, '{:.1f}')} | "
            f"{get(a, 'decode_working_set_bytes', 2**-20, '{:.1f}')} "
            f"({get(a, 'planned_peak_bytes', 2**-20, '{:.1f}')}) | "
            f"{get(m, 'decode_working_set_bytes', 2**-20, '{:.1f}')} | {get(m, 'ppl', 1, '{:.4f}')} | "
            f"{get(m, 'ppl_stderr', 1, '{:.4f}')} |")
    if none_ppl:
        lines += ["", "Perplexity relative to `none`: " + ", ".join(
            f"{s} {100 * (by['model']['ppl'] / none_ppl - 1):+.2f}%"
            for s, by in rows.items() if "ppl" in by.get("model", {}))]
        summary["ppl_vs_none"] = {s: by["model"]["ppl"] / none_ppl - 1
                                  for s, by in rows.items() if "ppl" in by.get("model", {})}
    if matvec:
        lines += ["", *matvec_table(matvec)]
        summary["matvec"] = matvec
    return "\n".join(lines), summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--ffn-chunks", type=int, default=8)
    parser.add_argument("--vocab-chunk", type=int, default=512)
    parser.add_argument("--kv-block", type=int, default=512)
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=1820)  # ~480 SmolLM2 tokens
    parser.add_argument("--ppl-chunks", type=int, default=20)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every run")
    parser.add_argument("--cache", default=None, help="paths.cache (default: $STAGEJAX_CACHE)")
    parser.add_argument("--matvec", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the matvec formulations (default on)")
    parser.add_argument("--matvec-only", action="store_true")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "quant_smollm2"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: "scheme/policy/round" in this process
    parser.add_argument("--resummarize", action="store_true",
                        help="rewrite the summary from the rounds already in --out, running nothing")
    args = parser.parse_args()
    out = Path(args.out)
    if args.resummarize:
        from stagejax_device.results import atomic_write_json, atomic_write_text

        runs = {(scheme, policy): [json.loads(f.read_text()) for f in
                                   sorted((out / scheme / policy).glob("round*/metrics.json"))]
                for scheme in args.schemes.split(",") for policy in args.policies.split(",")}
        runs = {key: rounds for key, rounds in runs.items() if rounds}
        args.rounds = min(len(rounds) for rounds in runs.values())
        rows: dict[str, dict] = {}
        for (scheme, policy), rounds in runs.items():
            rows.setdefault(scheme, {})[policy] = median_run(rounds[:args.rounds])
        matvec_file = out / "matvec.json"
        matvec = json.loads(matvec_file.read_text()) if matvec_file.exists() else None
        table, summary = summarize(rows, args, matvec)
        print(table)
        atomic_write_json(out / "summary.json", summary)
        atomic_write_text(out / "summary.md", table + "\n")
        return
    if args.one:
        scheme, policy, round_index = args.one.split("/")
        run_one(scheme, policy, out / scheme / policy / f"round{round_index}", args)
        return

    from stagejax_device.results import atomic_write_json, atomic_write_text

    matvec = None
    if args.matvec or args.matvec_only:
        # in a fresh process too: nothing else resident or compiled
        completed = subprocess.run([sys.executable, "-c", (
            "import json, sys; sys.path.insert(0, %r); import bench_quant; "
            "print(json.dumps(bench_quant.matvec_formulations()))") % str(Path(__file__).parent)],
            check=True, capture_output=True, text=True)
        matvec = json.loads(completed.stdout.strip().splitlines()[-1])
        print("\n".join(matvec_table(matvec)), flush=True)
        atomic_write_json(out / "matvec.json", matvec)
    if args.matvec_only:
        return

    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("model", "ffn_chunks", "vocab_chunk", "kv_block", "prefetch_depth",
                          "new_tokens", "prompt_chars", "ppl_chunks", "n_ctx")]
    forwarded += [f"--out={out}"] + ([f"--model-path={args.model_path}"] if args.model_path else [])
    forwarded += [f"--cache={args.cache}"] if args.cache else []
    runs: dict[tuple[str, str], list[dict]] = {}
    for round_index in range(args.rounds):
        for scheme in args.schemes.split(","):
            for policy in args.policies.split(","):
                print(f"round {round_index + 1}/{args.rounds}: quant={scheme} schedule={policy} ...",
                      flush=True)
                run_dir = out / scheme / policy / f"round{round_index}"
                subprocess.run([sys.executable, __file__, f"--one={scheme}/{policy}/{round_index}",
                                *forwarded], check=True)
                runs.setdefault((scheme, policy), []).append(
                    json.loads((run_dir / "metrics.json").read_text()))
    rows: dict[str, dict] = {}
    for (scheme, policy), rounds in runs.items():
        rows.setdefault(scheme, {})[policy] = median_run(rounds)
    table, summary = summarize(rows, args, matvec)
    print(table)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", table + "\n")


if __name__ == "__main__":
    main()
