"""The weight reader, A/B in fresh processes: the main job (`run_experiment`) on SmolLM2 float32
at context ~512, KV on disk, with `store.reader=python` and `store.reader=native` in interleaved
pairs (python, native, python, native, ...), each run a fresh process. The issue-4 benchmark's
schedule settings by default (`ffn_chunks` 8, `vocab_chunk` 512, depth 3).

    .venv/bin/python experiments/bench_reader.py [--policy atomic] [--pairs 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, run_isolated, smollm2_settings  # noqa: E402

READERS = ("python", "native")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="atomic")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "reader_smollm2"))
    args = parser.parse_args()

    from stagejax_device.results import atomic_write_json, atomic_write_text
    from stagejax.settings import StoreSettings

    out = Path(args.out)
    tps: dict[str, list[float]] = {reader: [] for reader in READERS}
    for pair in range(args.pairs):
        for reader in READERS:
            settings = smollm2_settings(args.policy, new_tokens=args.new_tokens, schedule=dict(
                ffn_chunks=8, vocab_chunk=512, kv_block=512, prefetch_depth=3))
            settings = dataclasses.replace(settings, store=StoreSettings(verify="open", reader=reader))
            metrics = run_isolated(settings, out / args.policy / reader / f"pair{pair + 1}")
            if "error" in metrics:
                raise SystemExit(f"{reader} failed: {metrics['error']}")
            tps[reader].append(metrics["decode_tokens_per_s"])
            print(f"pair {pair + 1}: {reader} {tps[reader][-1]:.2f} tokens/s", flush=True)
    ratios = [n / p for n, p in zip(tps["native"], tps["python"])]
    listed = lambda values: " / ".join(f"{v:.2f}" for v in values)
    table = "\n".join([
        f"{args.policy}, SmolLM2 float32, context ~512 (+{args.new_tokens} timed steps), KV on "
        f"disk, ffn_chunks 8, vocab_chunk 512, depth 3; {args.pairs} interleaved pairs, each run "
        "a fresh process", "",
        "| store.reader | decode tokens/s (median) | per pair |", "|---|---|---|",
        *(f"| {r} | {statistics.median(tps[r]):.2f} | {listed(tps[r])} |" for r in READERS), "",
        f"native / python within each pair: {listed(ratios)} (median {statistics.median(ratios):.2f}x)"])
    print(table)
    atomic_write_json(out / args.policy / "summary.json", {"tokens_per_s": tps, "ratios": ratios})
    atomic_write_text(out / args.policy / "summary.md", table + "\n")


if __name__ == "__main__":
    main()
