"""KV-cache layouts and dtypes on SmolLM2 float32 weights, in one run.

Part 1, per layout: perplexity on the first `--ppl-chunks` chunks of wiki.test.raw (n_ctx 512)
through the `atomic` schedule's own path — prefill in blocks that write the cache and read it
back, so a lossy dtype's error is in the number — and decode tokens/s at context ~512.
Part 2, a context sweep (128 ... 4096 tokens) under `atomic`, KV in RAM vs on disk: decode peak
(above the runtime baseline) and tokens/s. In RAM the KV term grows with the context; on disk
only one block is resident, so the decode peak stays flat.

    .venv/bin/python experiments/bench_kv.py [--ppl-chunks 20] [--contexts 128,256,512,1024,2048,4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, run_isolated, smollm2_settings  # noqa: E402

LAYOUTS = {  # name: cache settings
    "ram": dict(kind="ram"),
    "disk": dict(kind="disk"),
    "disk token_major": dict(kind="disk", order="token_major"),
    "disk block_tokens=64": dict(kind="disk", block_tokens=64),
    "disk_bf16": dict(kind="disk", dtype="bfloat16"),
    "disk_int8": dict(kind="disk", dtype="int8"),
}
CHARS_PER_TOKEN = 3.6  # WikiText-2 under SmolLM2's tokenizer, rounded down: prompts overshoot a little


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ppl-chunks", type=int, default=20)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--contexts", default="128,256,512,1024,2048,4096")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "kv_smollm2"))
    args = parser.parse_args()

    from stagejax_device.results import atomic_write_json, atomic_write_text

    out = Path(args.out)
    mb = 2 ** 20
    layout_rows = []
    for name in args.layouts.split(","):
        print(f"layout {name} ...", flush=True)
        settings = smollm2_settings("atomic", cache=LAYOUTS[name], ppl_chunks=args.ppl_chunks,
                                    new_tokens=args.new_tokens)
        metrics = run_isolated(settings, out / "layouts" / name.replace(" ", "_").replace("=", ""))
        layout_rows.append({"layout": name, **metrics})

    context_rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        for kind in ("ram", "disk"):
            print(f"context {context}, KV {kind} ...", flush=True)
            prompt_chars = int((context - args.new_tokens) * CHARS_PER_TOKEN)
            settings = smollm2_settings("atomic", cache=dict(kind=kind), new_tokens=args.new_tokens,
                                        prompt_chars=prompt_chars)
            metrics = run_isolated(settings, out / "contexts" / f"{kind}-{context}")
            context_rows.append({"context": context, "kv": kind, **metrics})

    lines = [f"SmolLM2-135M float32 weights, schedule atomic (ffn_chunks 8, vocab_chunk 512, kv_block "
             f"512, prefetch depth 2), warm page cache.", "",
             f"Layouts: perplexity on the first {args.ppl_chunks} chunks of wiki.test.raw (n_ctx 512) "
             f"through the staged path; decode at context ~512.", "",
             "| layout | dtype | order | PPL | ± | tokens/s | KV MB read/token | decode peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in layout_rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | failed: {r['error'][:160]} | | | | | | |")
            continue
        lines.append(f"| {r['layout']} | {r['cache_dtype']} | {r['cache_order']} | {r['ppl']:.4f} | "
                     f"{r['ppl_stderr']:.4f} | {r['decode_tokens_per_s']:.2f} | "
                     f"{(r['bytes_streamed_per_token'] - r['weight_bytes']) / mb:.2f} | "
                     f"{r['peak_rss_decode_bytes'] / mb:.2f} |")
    lines += ["", "Context sweep (atomic, float32 KV): decode peak above the runtime baseline and tokens/s.", "",
              "| context | KV in RAM: decode peak MB | tokens/s | KV on disk: decode peak MB | tokens/s |",
              "|---|---|---|---|---|"]
    by = {(r["context"], r["kv"]): r for r in context_rows}
    for context in sorted({r["context"] for r in context_rows}):
        cells = []
        for kind in ("ram", "disk"):
            r = by.get((context, kind), {"error": "missing"})
            cells += (["failed", ""] if "error" in r else
                      [f"{r['peak_rss_decode_bytes'] / mb:.2f}", f"{r['decode_tokens_per_s']:.2f}"])
        real = by.get((context, "disk"), {}).get("prompt_tokens")
        label = f"{context} ({real}+{args.new_tokens})" if real else str(context)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write_json(out / "summary.json", {"layouts": layout_rows, "contexts": context_rows})
    atomic_write_text(out / "summary.md", table + "\n")


if __name__ == "__main__":
    main()
