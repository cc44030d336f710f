"""Benchmark of `stagejax.store.WeightStore` against a raw read of the same bytes.

Streams every array of a model's stage-shard checkpoint once, in stage order, and reports MB/s:

  raw          the chunk files read in the same order with plain `readinto` into one buffer
               (files opened beforehand, as the store's are)
  store        `WeightStore.read([key])` + `release` per array (verify="off" unless named)
  prefetch     `Prefetcher.next()` + `release` per array, a background thread `--depth` ahead
  tensorstore  `ts.open` once per array (zarr driver, reused handles), `.read().result()` per array

each cold (the checkpoint's pages dropped with posix_fadvise(DONTNEED) just before) and warm
(re-read right after the cold pass, well inside the ~60 s before the page cache is reclaimed).
Also: the per-read time of arrays under 64 KiB, `Prefetcher.next()+release()` per call, one
embedding row, the cost of each `verify` mode, and a stream with a matvec per array (sync vs
prefetch) to show overlap. Every figure is a median over `--repeats` runs, measured in one
process so ratios compare like with like.

    python scripts/bench_weight_store.py                     # SmolLM2-135M, 7 repeats
    python scripts/bench_weight_store.py --model tiny --repeats 2

Writes experiments/results/weight_store_<model>.json (atomically) and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # MACHINE_NOTES: BLAS threads fight on 2 cores
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from stagejax.loading import open_model  # noqa: E402
from stagejax_device.results import atomic_write_json  # noqa: E402
from stagejax.store import WeightStore, convert_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL_BYTES = 64 * 1024  # "small" arrays: the per-read overhead dominates their read time
MB = 1e6


def proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


class Timed:
    """Wall time of a block plus the bytes the kernel fetched from storage meanwhile."""

    def __enter__(self):
        self.io0 = proc_io()["read_bytes"]
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
        self.storage_bytes = proc_io()["read_bytes"] - self.io0


def raw_stream(files, buffer: bytearray) -> None:
    view = memoryview(buffer)
    for f, n in files:
        f.seek(0)
        got = f.readinto(view[:n])
        assert got == n, (f.name, got, n)


def store_stream(store: WeightStore, keys) -> None:
    for key in keys:
        store.release(store.read([key]))


def prefetch_stream(store: WeightStore, keys, depth: int, compute=None, advise=False) -> float:
    """Stream `keys` through a prefetcher; returns the io wait seen by the consumer."""
    wait0 = store.io_wait_s
    with store.prefetcher([[k] for k in keys], depth, advise_ahead=advise) as prefetcher:
        for _ in keys:
            arrays = prefetcher.next()
            if compute is not None:
                compute(arrays)
            prefetcher.release(arrays)
    return store.io_wait_s - wait0


def sync_compute_stream(store: WeightStore, keys, compute) -> None:
    for key in keys:
        arrays = store.read([key])
        compute(arrays)
        store.release(arrays)


def matvec(arrays) -> None:
    """A decode-like use of each array: one matvec over its rows."""
    for a in arrays.values():
        w = a.reshape(a.shape[0], -1)
        w.T @ np.ones(w.shape[0], np.float32)


def tensorstore_open(path: Path, manifest):
    import tensorstore as ts

    handles = {}
    for key, info in manifest.arrays.items():
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / Path(info.file).parent)}}
        handles[key] = ts.open(spec, read=True).result()
    return handles


def tensorstore_stream(handles, keys) -> None:
    for key in keys:
        handles[key].read().result()


def per_call_us(fn, items, repeats: int = 3) -> float:
    """Median wall time of fn(item) in µs over `repeats` passes of `items`."""
    times = []
    for _ in range(repeats):
        for item in items:
            t0 = time.perf_counter()
            fn(item)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def run_once(keys, total_bytes: int, depth: int, stores: dict, paths: dict, files, buffer,
             ts_handles, order: int) -> dict:
    store = stores["off"]
    verifying = {name[len("read:"):]: s for name, s in stores.items() if name.startswith("read:")}
    out: dict = {}

    def cold(name, fn, s):
        s.drop_page_cache()
        with Timed() as t:
            fn()
        out[f"cold_{name}_MBps"] = total_bytes / t.s / MB
        out[f"cold_{name}_storage_frac"] = t.storage_bytes / total_bytes

    def warm(name, fn):
        with Timed() as t:
            fn()
        out[f"warm_{name}_MBps"] = total_bytes / t.s / MB

    passes = [
        ("raw", lambda: raw_stream(files["primary"], buffer), store),
        ("store", lambda: store_stream(store, keys), store),
        ("prefetch", lambda: prefetch_stream(store, keys, depth), store),
        ("prefetch_advise", lambda: prefetch_stream(store, keys, depth, advise=True), store),
        ("tensorstore", lambda: tensorstore_stream(ts_handles, keys), store),
    ] + [(f"store_verify_{alg}", functools.partial(store_stream, s, keys), s)
         for alg, s in verifying.items()]
    # Each further checkpoint (another checksum) has its own files, maybe laid out differently
    # on disk: its verify pass is compared with a raw read of its own files.
    passes += [(f"raw_{alg}", functools.partial(raw_stream, f, buffer), stores[f"read:{alg}"])
               for alg, f in files.items() if alg != "primary"]
    if order % 2:  # alternate the order of the passes between repeats
        passes = passes[::-1]
    for name, fn, s in passes:
        cold(name, fn, s)
        warm(name, fn)

    # Read + compute: synchronous vs prefetching, warm and cold.
    for temperature in ("warm", "cold"):
        for name, fn in (("sync", lambda: sync_compute_stream(store, keys, matvec)),
                         ("prefetch", lambda: prefetch_stream(store, keys, depth, matvec)),
                         ("prefetch_advise",
                          lambda: prefetch_stream(store, keys, depth, matvec, advise=True))):
            if temperature == "cold":
                store.drop_page_cache()
            with Timed() as t:
                fn()
            out[f"{temperature}_matvec_{name}_s"] = t.s
    resident = {key: store.read([key]) for key in keys}
    t0 = time.perf_counter()
    for key in keys:
        matvec(resident[key])
    out["matvec_only_s"] = time.perf_counter() - t0
    for arrays in resident.values():
        store.release(arrays)

    # Small arrays, warm: per-read time of the store, of a raw pread, of tensorstore.
    small = [k for k in keys if store.manifest.arrays[k].nbytes < SMALL_BYTES]
    if small:
        store_stream(store, small)  # touch them: warm
        scratch = bytearray(SMALL_BYTES)
        fds = {k: store._entries[k].fd for k in small}
        sizes = {k: store.manifest.arrays[k].nbytes for k in small}
        out["small_arrays"] = len(small)
        out["small_mean_bytes"] = float(np.mean([sizes[k] for k in small]))
        out["small_store_read_us"] = per_call_us(lambda k: store.release(store.read([k])), small)
        for alg, s in verifying.items():
            store_stream(s, small)
            out[f"small_store_verify_{alg}_read_us"] = per_call_us(
                lambda k: s.release(s.read([k])), small)
        out["small_raw_pread_us"] = per_call_us(
            lambda k: os.preadv(fds[k], [memoryview(scratch)[:sizes[k]]], 0), small)
        out["small_tensorstore_read_us"] = per_call_us(lambda k: ts_handles[k].read().result(), small)
        for d in (0, depth):
            with store.prefetcher([[k] for k in small], d) as prefetcher:
                for _ in small:  # let the thread fill its queue once
                    prefetcher.release(prefetcher.next())
                out[f"small_prefetch_depth{d}_next_release_us"] = per_call_us(
                    lambda _: prefetcher.release(prefetcher.next()), small)
    # One embedding row (an embed lookup), warm.
    rows = np.random.default_rng(order).integers(0, store.manifest.arrays["embed/0/w"].shape[0], 50)
    for name, s in [("off", store)] + [(alg, s) for alg, s in verifying.items()]:
        s.release(s.read_rows("embed/0/w", rows))  # warm those rows
        out[f"embed_row_verify_{name}_us"] = per_call_us(
            lambda r: s.release(s.read_rows("embed/0/w", [r])), rows)
    # Opening a store: verify="off" (sizes only) and "open" (every block checked), warm.
    for alg, path in paths.items():
        for mode in ("off", "open"):
            WeightStore(path, verify=mode).close()  # warm
            t0 = time.perf_counter()
            WeightStore(path, verify=mode).close()
            out[f"open_{alg}_verify_{mode}_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--path", default=None, help="GGUF file or HF directory instead of the preset's")
    parser.add_argument("--cache-dir", default=None, help="paths.cache (default $STAGEJAX_CACHE or ~/.cache/stagejax)")
    parser.add_argument("--ffn-chunks", type=int, default=1)
    parser.add_argument("--vocab-chunk", type=int, default=None)
    parser.add_argument("--depth", type=int, default=2, help="prefetch depth")
    parser.add_argument("--checksums", default="xxh3_64,crc32",
                        help="checksum algorithms to time verify=read with (one checkpoint each)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    handle = open_model(args.model, args.path)
    algorithms = args.checksums.split(",")
    paths = {alg: convert_checkpoint(handle, args.cache_dir, args.ffn_chunks, args.vocab_chunk,
                                     checksum=alg) for alg in algorithms}
    path = paths[algorithms[0]]
    stores = {"off": WeightStore(path, verify="off", expect_config=handle.config)}
    stores.update({f"read:{alg}": WeightStore(p, verify="read", expect_config=handle.config)
                   for alg, p in paths.items()})
    manifest = stores["off"].manifest
    keys = manifest.keys
    total_bytes = manifest.nbytes
    files = {alg: [(open(p / manifest.arrays[k].file, "rb", buffering=0), manifest.arrays[k].nbytes)
                   for k in keys] for alg, p in paths.items()}
    files["primary"] = files.pop(algorithms[0])
    buffer = bytearray(max(info.nbytes for info in manifest.arrays.values()))
    ts_handles = tensorstore_open(path, manifest)
    # Correctness of what is timed: the direct path and tensorstore return the same bytes.
    checker = stores[f"read:{algorithms[0]}"]
    for key in keys:
        arrays = checker.read([key])
        assert np.array_equal(arrays[key], ts_handles[key].read().result()), key
        checker.release(arrays)

    runs = []
    for r in range(args.repeats):
        run = run_once(keys, total_bytes, args.depth, stores, paths, files, buffer, ts_handles, r)
        runs.append(run)
        print(f"repeat {r + 1}/{args.repeats}: cold store {run['cold_store_MBps']:.0f} MB/s, "
              f"raw {run['cold_raw_MBps']:.0f} MB/s", file=sys.stderr)
    medians = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    m = medians
    # Ratios are taken per run (raw and store measured minutes apart would compare noise).
    ratio = lambda a, b: statistics.median(run[a] / run[b] for run in runs)  # noqa: E731
    derived = {f"cold_{name}_over_raw": ratio(f"cold_{name}_MBps", "cold_raw_MBps")
               for name in ["store", "prefetch", "prefetch_advise", "tensorstore",
                            f"store_verify_{algorithms[0]}"]}
    derived.update({f"cold_store_verify_{alg}_over_raw": ratio(f"cold_store_verify_{alg}_MBps",
                                                               f"cold_raw_{alg}_MBps")
                    for alg in algorithms[1:]})
    derived.update({f"warm_{name}_over_store": ratio(f"warm_{name}_MBps", "warm_store_MBps")
                    for name in ["raw", "prefetch", "prefetch_advise", "tensorstore"]
                    + [f"store_verify_{alg}" for alg in algorithms]})
    if "small_store_read_us" in m:
        # Per-read overhead: time of a small read minus its bytes at the warm streaming rate.
        derived["small_store_overhead_us"] = (m["small_store_read_us"]
                                              - m["small_mean_bytes"] / (m["warm_store_MBps"] * MB) * 1e6)
    for checkpoint_files in files.values():
        for f, _ in checkpoint_files:
            f.close()
    for s in stores.values():
        s.close()

    import jax
    import orbax.checkpoint
    result = {
        "bench": "weight_store",
        "settings": {"model": args.model, "checkpoints": {a: str(p) for a, p in paths.items()},
                     "ffn_chunks": args.ffn_chunks, "vocab_chunk": args.vocab_chunk,
                     "prefetch_depth": args.depth, "checksums": algorithms,
                     "repeats": args.repeats, "n_arrays": len(keys), "total_bytes": total_bytes,
                     "small_bytes_threshold": SMALL_BYTES},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "numpy": np.__version__,
                    "jax": jax.__version__, "orbax_checkpoint": orbax.checkpoint.__version__},
        "targets": {"cold_store_over_raw_min": 0.8, "small_store_overhead_us_max": 300.0},
        "medians": medians,
        "derived": derived,
        "runs": runs,
        "unix_time": time.time(),
    }
    out = Path(args.out) if args.out else REPO / "experiments" / "results" / f"weight_store_{args.model}.json"
    atomic_write_json(out, result)
    print(format_table(result))
    print(f"results: {out}")
    return result


def format_table(result: dict) -> str:
    m, d, s = result["medians"], result["derived"], result["settings"]
    algorithms = s["checksums"]
    lines = [f"WeightStore, {s['model']}: {s['n_arrays']} arrays, {s['total_bytes'] / MB:.1f} MB, "
             f"stage order, medians of {s['repeats']} runs (prefetch depth {s['prefetch_depth']})",
             f"{'path':<30}{'cold MB/s':>11}{'warm MB/s':>11}{'cold/raw':>10}{'warm/store':>12}"]
    labels = {"raw": "raw readinto", "store": "store, verify=off",
              "prefetch": "prefetch, verify=off", "prefetch_advise": "prefetch + WILLNEED ahead",
              "tensorstore": "tensorstore (reused handles)"}
    labels.update({f"store_verify_{a}": f"store, verify=read {a}" for a in algorithms})
    labels.update({f"raw_{a}": f"raw readinto, {a} ckpt" for a in algorithms[1:]})
    fmt = lambda x: f"{x:.2f}" if x is not None else "-"  # noqa: E731
    for name, label in labels.items():
        cold_ratio = 1.0 if name == "raw" else d.get(f"cold_{name}_over_raw")
        warm_ratio = 1.0 if name == "store" else d.get(f"warm_{name}_over_store")
        lines.append(f"{label:<30}{m[f'cold_{name}_MBps']:>11.0f}{m[f'warm_{name}_MBps']:>11.0f}"
                     f"{fmt(cold_ratio):>10}{fmt(warm_ratio):>12}")
    if algorithms[1:]:
        lines.append("(cold/raw of verify=read with another checksum is against the raw read "
                     "of that checkpoint's own files)")
    if "small_store_read_us" in m:
        verify = ", ".join(f"verify=read {a} {m[f'small_store_verify_{a}_read_us']:.1f}" for a in algorithms)
        lines.append(f"arrays < 64 KiB ({m['small_arrays']:.0f}, mean {m['small_mean_bytes']:.0f} B), warm, "
                     f"µs per read: store {m['small_store_read_us']:.1f} (overhead "
                     f"{d['small_store_overhead_us']:.1f}), {verify}, raw pread "
                     f"{m['small_raw_pread_us']:.1f}, tensorstore {m['small_tensorstore_read_us']:.1f}")
        depth = s["prefetch_depth"]
        lines.append(f"Prefetcher next()+release() per small unit: depth 0 "
                     f"{m['small_prefetch_depth0_next_release_us']:.1f} µs, depth {depth} "
                     f"{m[f'small_prefetch_depth{depth}_next_release_us']:.1f} µs")
    rows = ", ".join(f"verify={'off' if a == 'off' else 'read ' + a} {m[f'embed_row_verify_{a}_us']:.1f}"
                     for a in ["off"] + algorithms)
    lines.append(f"one embedding row (read_rows), µs: {rows}")
    opens = "; ".join(f"{a}: verify=off {m[f'open_{a}_verify_off_s'] * 1e3:.0f} ms, verify=open "
                      f"{m[f'open_{a}_verify_open_s'] * 1e3:.0f} ms" for a in algorithms)
    lines.append(f"open (warm) {opens}")
    lines.append(f"read + matvec per array, s: warm sync {m['warm_matvec_sync_s']:.3f} / prefetch "
                 f"{m['warm_matvec_prefetch_s']:.3f} / +WILLNEED {m['warm_matvec_prefetch_advise_s']:.3f}; "
                 f"cold sync {m['cold_matvec_sync_s']:.3f} / prefetch {m['cold_matvec_prefetch_s']:.3f}"
                 f" / +WILLNEED {m['cold_matvec_prefetch_advise_s']:.3f}; matvec alone {m['matvec_only_s']:.3f}")
    lines.append(f"cold passes, bytes fetched from storage / bytes streamed: store "
                 f"{m['cold_store_storage_frac']:.2f}, raw {m['cold_raw_storage_frac']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
