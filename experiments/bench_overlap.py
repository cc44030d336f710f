"""Does prefetching hide the page-cache copies behind compute? One staged plan's decode step
measured in one process under several ways of getting its weights, interleaved over rounds:

  resident       zero weights already in memory (the dry run's stand-ins): executables and the
                 executor's loop only, no copying
  copy           the plan's weight units read from the page cache into slabs on the main thread,
                 nothing computed: the copies alone
  serial         prefetch depth 0: each unit read by the main thread, then computed
  python         a Python prefetch thread reads `--depth` units ahead (with shared reads: a
                 waiting executor reads a unit itself), handing units over with a condition
                 variable under the GIL
  native         the same with the GIL-free C reader (`stagejax_device.native_stream`)
  decoy-python   the Python thread copies every unit and the executor waits for each, but
  decoy-native   computes on resident zeros (the same for the C reader): the copying and
                 hand-offs without consuming memory another core has just written

Perfect overlap would take max(resident, copy); none takes resident + copy, as `serial` does.

    PYTHONPATH=. .venv/bin/python experiments/bench_overlap.py [--policy atomic] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import REPO, smollm2_settings  # noqa: E402

MODES = ("resident", "copy", "serial", "python", "native", "decoy-python", "decoy-native")


class _Decoy:
    """A prefetcher that waits for each real unit, then hands out resident zeros instead."""

    def __init__(self, real, zeros):
        self.real, self.zeros = real, zeros
        self._lent: dict[int, dict] = {}

    def next(self) -> dict:
        unit = self.real.next()
        stand_in = self.zeros.next()
        self._lent[id(stand_in)] = unit
        return stand_in

    def release(self, arrays) -> None:
        self.real.release(self._lent.pop(id(arrays)))

    def close(self) -> None:
        self.real.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default="atomic")
    parser.add_argument("--budget-mb", type=float, default=None)
    parser.add_argument("--ffn-chunks", type=int, default=8)
    parser.add_argument("--vocab-chunk", type=int, default=512)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated subset; resident and copy are always measured")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "overlap_smollm2"))
    args = parser.parse_args()
    modes = tuple(dict.fromkeys(("resident", "copy") + tuple(args.modes.split(","))))
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; choose from {MODES}")

    import jax
    import numpy as np

    from stagejax import experiment as ex
    from stagejax.engine import ScheduleRun
    from stagejax.scheduler import RESIDENT_POLICIES
    from stagejax.executor import _ZeroPrefetcher, _ZeroWeights
    from stagejax_device.results import atomic_write_json, atomic_write_text
    from stagejax.sampling import SamplingConfig
    from stagejax_device.coalesce import CoalescingPrefetcher
    from stagejax_device.weight_store import WeightStore

    schedule = dict(ffn_chunks=args.ffn_chunks, vocab_chunk=args.vocab_chunk, prefetch_depth=args.depth)
    if args.budget_mb is not None:
        schedule["budget_mb"] = args.budget_mb
    settings = smollm2_settings(args.policy, new_tokens=1, schedule=schedule)
    ex.use_one_malloc_arena()
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # as runs do
    handle = ex.open_model(settings.model.name, settings.model.path, settings.seed)
    ids = ex.prompt_ids(handle.tokenizer, settings)
    checkpoint = ex.convert_checkpoint(handle, settings.paths.cache, args.ffn_chunks,
                                       args.vocab_chunk, "none", progress=False)
    store = WeightStore(checkpoint, verify="open", expect_config=handle.config)
    # Every timed step decodes at the same position (its KV row rewritten), so the past each
    # step attends over, and with it the step's work, is the same in every mode and round.
    if settings.schedule.policy in RESIDENT_POLICIES:
        raise SystemExit("bench_overlap measures staged schedules; `model` streams nothing")
    run = ScheduleRun(settings, handle, store, len(ids) + 1, len(ids), SamplingConfig())
    decoder = run.engine
    units = decoder._units
    zeros = _ZeroWeights(store.manifest)
    for unit in units:  # touch every stand-in once: resident means resident
        zeros.next_unit(unit)
    unit_bytes = sum(store.nbytes(u) for u in units)

    def install(mode: str):
        decoder.prefetcher.close()
        if mode == "resident":
            decoder.prefetcher = _ZeroPrefetcher(zeros, units)
            decoder.prefetcher.close = lambda: None
        elif mode == "serial":
            decoder.prefetcher = CoalescingPrefetcher(store, units, 0)
        else:
            reader = mode.rsplit("-", 1)[-1]
            decoder.prefetcher = CoalescingPrefetcher(store, units, args.depth, reader)
            if decoder.prefetcher.reader != reader:
                raise SystemExit(f"the {reader} reader is unavailable here")
            if mode.startswith("decoy"):
                decoder.prefetcher = _Decoy(decoder.prefetcher, _ZeroPrefetcher(zeros, units))

    position = len(ids)
    token = int(np.argmax(np.asarray(decoder.prefill(ids))))
    for _ in range(3):
        token = int(np.argmax(np.asarray(decoder.step(token, position))))

    def copy_pass() -> float:
        """Read every unit once into one reused slab, as the prefetcher reads (no compute)."""
        inner = CoalescingPrefetcher(store, units, 0)
        start = time.perf_counter()
        for _ in units:
            inner.release(inner.next())
        seconds = time.perf_counter() - start
        inner.close()
        return seconds

    times = {mode: [] for mode in modes}  # per round: median step seconds
    for r in range(args.rounds):
        for mode in modes:
            if mode == "copy":
                times[mode].append(float(np.median([copy_pass() for _ in range(args.steps)])))
                continue
            install(mode)
            token = int(np.argmax(np.asarray(decoder.step(token, position))))  # settle
            steps = []
            for _ in range(args.steps):
                start = time.perf_counter()
                token = int(np.argmax(np.asarray(decoder.step(token, position))))
                steps.append(time.perf_counter() - start)
            times[mode].append(float(np.median(steps)))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{m} {times[m][-1] * 1e3:.1f}" for m in modes), flush=True)
    decoder.close()
    store.close()

    median = lambda values: float(np.median(values))
    ms = {m: median(times[m]) * 1e3 for m in modes}
    # Per round, how much of the smaller side the thread hid: 1 = max(resident, copy), 0 = sum.
    hidden = {m: [(t_res + t_copy - t) / min(t_res, t_copy)
                  for t_res, t_copy, t in zip(times["resident"], times["copy"], times[m])]
              for m in modes[2:]}
    label = args.policy + (f"@{args.budget_mb:g}MB" if args.budget_mb is not None else "")
    lines = [
        f"{label}: SmolLM2 float32, context {len(ids)}+, KV on disk, ffn_chunks {args.ffn_chunks}, "
        f"vocab_chunk {args.vocab_chunk}, prefetch depth {args.depth}; {len(decoder.groups)} groups, "
        f"{len(units)} weight units, {unit_bytes / 2**20:.0f} MB streamed per step; "
        f"{args.rounds} interleaved rounds x {args.steps} steps, one process "
        f"(median of rounds, then each round's median)", "",
        "| mode | ms/step | rounds | overlap: share of the smaller side hidden |",
        "|---|---|---|---|"]
    for m in modes:
        overlap = (f"{median(hidden[m]):.2f} ({' / '.join(f'{h:.2f}' for h in hidden[m])})"
                   if m in hidden else "")
        lines.append(f"| {m} | {ms[m]:.1f} | {' / '.join(f'{t * 1e3:.1f}' for t in times[m])} | {overlap} |")
    lines += ["", f"copy rate alone {unit_bytes / (ms['copy'] / 1e3) / 1e9:.1f} GB/s; perfect overlap "
                  f"would give {max(ms['resident'], ms['copy']):.1f} ms, none {ms['resident'] + ms['copy']:.1f} ms"
                  + (f"; native / python step: {ms['native'] / ms['python']:.2f}x, within each round "
                  + " / ".join(f"{n / p:.2f}" for n, p in zip(times["native"], times["python"]))
                  if "native" in ms and "python" in ms else "")]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out) / label
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", {
        "policy": args.policy, "budget_mb": args.budget_mb, "depth": args.depth,
        "ffn_chunks": args.ffn_chunks, "vocab_chunk": args.vocab_chunk, "groups": len(decoder.groups),
        "units": len(units), "bytes_streamed_per_step": unit_bytes, "rounds": args.rounds,
        "steps": args.steps, "step_s": times, "overlap": hidden})
    atomic_write_text(out / "summary.md", table + "\n")


if __name__ == "__main__":
    main()
