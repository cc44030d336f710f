#!/usr/bin/env python
"""Does a long decode grow the process's anonymous memory? The slope of RssAnon per token.

    scripts/bench_rss_slope.py --tokens 2000 --out experiments/results/rss_slope_smollm2 \\
        -- schedule=atomic cache=disk paths.cache=/path/to/cache

Builds the main job's decoding session (`stagejax.engine.ScheduleRun`, the run's settings
from the given overrides, perplexity off), prefills the prompt and decodes `--tokens` greedy
tokens, ignoring end-of-sequence so the count is exact, reading the anonymous resident memory
(`RssAnon` of /proc/self/status: heap and anonymous mappings; file pages such as shared
libraries and the page cache are not in it) every `--every` tokens. Freed heap is returned to
the OS first (`malloc_trim`, as the main job does before decoding); otherwise a leak could fill
free pages the process already holds and not show for a while. The slope is a least-squares
fit over the tokens after `--skip` (warm-up: buffers and caches that fill once); its value
times the tokens decoded is what a leak would have added. Writes `rss.csv`, `summary.json` and
`summary.md` into `--out`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

REPO = Path(__file__).resolve().parents[1]


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--skip", type=int, default=200, help="warm-up tokens left out of the fit")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="main-job overrides, e.g. schedule=atomic cache=disk")
    args = parser.parse_args()

    import jax
    import numpy as np
    from hydra import compose, initialize_config_dir

    from stagejax.engine import ScheduleRun
    from stagejax.experiment import prompt_ids
    from stagejax.loading import open_model, release_freed_memory, use_one_malloc_arena
    from stagejax.run import CONF_DIR, to_settings
    from stagejax.sampling import SamplingConfig
    from stagejax.store import WeightStore, convert_checkpoint

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        settings = to_settings(compose("config", [*args.overrides, "eval.ppl_chunks=0",
                                                  f"decode.max_new_tokens={args.tokens}"]))
    use_one_malloc_arena()
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # as the main job runs
    handle = open_model(settings.model.name, settings.model.path, settings.seed)
    ids = prompt_ids(handle.tokenizer, settings)
    checkpoint = convert_checkpoint(handle, settings.paths.cache, settings.schedule.ffn_chunks,
                                    settings.schedule.vocab_chunk, settings.quant.scheme, progress=False)
    store = WeightStore(checkpoint, verify=settings.store.verify, expect_config=handle.config)
    sampling = SamplingConfig(settings.decode.temperature, settings.decode.top_k, settings.decode.top_p)
    run = ScheduleRun(settings, handle, store, len(ids) + args.tokens + 1, len(ids), sampling)
    run.engine.load()
    session = run.engine
    key = jax.random.PRNGKey(settings.seed)
    token = int(session.sample(session.prefill(ids), key))
    run.engine.release_pass_buffers(keep_tokens=1)
    # As the main job does before decoding: freed heap goes back to the OS, so memory a leak
    # takes later is new resident pages, not reused free ones (which RssAnon would not show).
    release_freed_memory()
    rows, start = [], time.perf_counter()
    for n in range(1, args.tokens + 1):
        token = int(session.sample(session.step(token, len(ids) + n - 1), key))
        if n % args.every == 0 or n == args.tokens:
            rows.append((n, rss_anon_bytes(), time.perf_counter() - start))
    decode_s = time.perf_counter() - start
    run.close()
    store.close()

    fit = [(n, rss) for n, rss, _ in rows if n > args.skip]
    tokens, rss = np.array([n for n, _ in fit], float), np.array([r for _, r in fit], float)
    slope = float(np.polyfit(tokens, rss, 1)[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rss.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["token", "rss_anon_bytes", "seconds"])
        writer.writerows((n, r, f"{s:.3f}") for n, r, s in rows)
    summary = {
        "overrides": args.overrides, "model": settings.model.name,
        "schedule": settings.schedule.policy, "cache": settings.cache.kind,
        "prompt_tokens": len(ids), "decoded_tokens": args.tokens, "fit_after_token": args.skip,
        "slope_bytes_per_token": slope, "slope_times_tokens_bytes": slope * args.tokens,
        "rss_anon_first_bytes": rows[0][1], "rss_anon_last_bytes": rows[-1][1],
        "rss_anon_max_minus_min_after_skip_bytes": float(rss.max() - rss.min()),
        "decode_tokens_per_s": args.tokens / decode_s,
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# Anonymous RSS over a {args.tokens}-token decode ({summary['date_utc']} UTC)", "",
             f"`scripts/bench_rss_slope.py --tokens {args.tokens} -- {' '.join(args.overrides)}` "
             f"({settings.model.name}, {settings.schedule.policy}, cache={settings.cache.kind}; "
             f"{len(ids)}-token prompt; RssAnon every {args.every} tokens, fit after token {args.skip}).",
             "",
             f"- slope: **{slope:.1f} bytes per token** = {slope * args.tokens / 1e6:.3f} MB over "
             f"{args.tokens} tokens",
             f"- RssAnon: {rows[0][1] / 2**20:.1f} MiB at token {rows[0][0]}, "
             f"{rows[-1][1] / 2**20:.1f} MiB at token {rows[-1][0]} (range after token "
             f"{args.skip}: {(rss.max() - rss.min()) / 2**20:.2f} MiB)",
             f"- decode: {summary['decode_tokens_per_s']:.2f} tokens/s (sampling RSS included)",
             "", "Series: `rss.csv`."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
