"""Calibration microbenchmarks: the roofline constants of the machine this process runs on.

Owns the measurement of `stagejax.roofline.Device` figures for `this_machine`: float32 (and
bfloat16) matmul FLOP/s, the weight-streaming rate of batch-1 matrix-vector products, memory
read bandwidth, storage read bandwidth cold and warm, and the
per-call dispatch overhead of a jitted function. Results are cached as JSON per machine under
`<cache_dir>/calibration/<key>.json` (key: hostname, CPU model, jax version), written atomically.

Every figure is the median of several repeats; the record keeps each figure's spread
(interquartile range / median), its best and worst repeat, and the load average while it ran,
because this project's machines are shared and noisy.

The memory read bandwidth probe (`measure_memory_read_bandwidth`) is built to be reproducible:
  * one thread: a numpy OR-reduction over a uint64 view, which numpy runs in the calling thread
    (ufunc reductions never use threads) and which is memory-bound for arrays far beyond the
    last-level cache (it runs ~2x faster on cache-resident data, measured);
  * real, distinct, pre-touched memory: a pattern (index x an odd constant) written by numpy
    before timing, so every page is resident and distinct (no zero page, no merged pages, no
    broadcast XLA could fold away);
  * timed by the thread's CPU time (`time.thread_time`), so time the thread spends descheduled
    by other processes — the dominant disturbance on a 2-core machine shared by several jobs —
    does not count; the wall-clock rate and the CPU share the probe got are recorded beside it.
The earlier probe, `jax.jit(jnp.sum)` over 512 MB, varied 2x run to run (24.4 vs 47.0 GB/s)
because XLA runs a large reduction on every core it has (1 or 2 effective cores depending on
what else runs; pinned to one core it read ~19 GB/s, on two ~33 GB/s in one measurement) and its
wall-clock time includes time-slicing by other processes. `jnp.ones` was not the cause: as a jit
argument it is a materialised buffer (the HLO reduces its argument), and interleaved in one
process it summed at the rate of random data. Measurements: docs/roofline.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import re
import socket
import time
from pathlib import Path
from typing import Callable

import numpy as np

from stagejax_device.results import atomic_write_json
from stagejax_device.weight_store import aligned_empty  # the weight store's own buffers
from stagejax.roofline import Device

CALIBRATION_FORMAT = 6  # bump when the probes change meaning: cached records are re-measured


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One calibrated figure: the median over repeats, its spread (interquartile range /
    median), the best and worst repeat (highest rate, or shortest time for unit "s"), and how
    it was measured."""

    value: float
    spread: float
    best: float
    worst: float
    repeats: int
    unit: str
    how: str
    extra: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, samples, unit: str, how: str, **extra) -> "Measurement":
        samples = np.asarray(samples, dtype=np.float64)
        median = float(np.median(samples))
        q25, q75 = np.percentile(samples, [25, 75])
        best, worst = (samples.min(), samples.max()) if unit == "s" else (samples.max(), samples.min())
        return cls(median, float((q75 - q25) / median) if median else 0.0, float(best),
                   float(worst), int(samples.size), unit, how,
                   {**extra, "load_avg_1min": os.getloadavg()[0]})


def _timed(fn: Callable[[], object], repeats: int, warmup: int = 1,
           clock: Callable[[], float] = time.perf_counter) -> np.ndarray:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return np.asarray(times)


# ---- memory -----------------------------------------------------------------------------------


def _distinct_pages(n_bytes: int) -> np.ndarray:
    """`n_bytes` of resident memory, every 8-byte word distinct: index x an odd 64-bit constant
    (Fibonacci hashing), written in place, so every page is touched before any timing."""
    words = np.arange(n_bytes // 8, dtype=np.uint64)
    words *= np.uint64(0x9E3779B97F4A7C15)
    return words


def memory_read_probe(n_bytes: int = 512 << 20, repeats: int = 9) -> Measurement:
    """Single-thread memory read bandwidth (bytes/s): see the module docstring."""
    if n_bytes < 64 << 20:
        raise ValueError(f"the memory probe needs an array far beyond the last-level cache: "
                         f"n_bytes >= 64 MiB, got {n_bytes}")
    words = _distinct_pages(n_bytes)
    reduce = np.bitwise_or.reduce
    reduce(words)  # warm-up
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        reduce(words)
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    cpu, wall = np.asarray(cpu), np.asarray(wall)
    nbytes = words.nbytes
    del words
    return Measurement.of(
        nbytes / cpu, "bytes/s",
        f"numpy bitwise_or.reduce over {nbytes >> 20} MiB of distinct pre-touched uint64, "
        f"1 thread, bytes / thread CPU time, median of {repeats}",
        threads=1, n_bytes=nbytes,
        wall_bytes_per_s=float(np.median(nbytes / wall)),
        cpu_share=float(np.median(cpu / wall)))


def measure_memory_read_bandwidth(n_bytes: int = 512 << 20, repeats: int = 9) -> tuple[float, float]:
    """(median bytes/s, spread = interquartile range / median) of the single-thread memory
    read probe, for benchmarks that want the figure measured in their own run."""
    m = memory_read_probe(n_bytes, repeats)
    return m.value, m.spread


def xla_sum_probe(n_bytes: int = 512 << 20, repeats: int = 7) -> Measurement:
    """The old probe, kept for comparison: a jitted float32 sum (XLA picks its threads) over
    distinct random data put on the device; wall-clock rate and the process CPU share."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal(n_bytes // 4, dtype=np.float32))
    total = jax.jit(jnp.sum)
    run = lambda: total(x).block_until_ready()
    run()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        run()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    cpu, wall = np.asarray(cpu), np.asarray(wall)
    return Measurement.of(n_bytes / wall, "bytes/s",
                          f"jax.jit(jnp.sum) over {n_bytes >> 20} MiB float32 random data, "
                          f"wall clock, median of {repeats}",
                          cpu_per_wall=float(np.median(cpu / wall)), n_bytes=n_bytes)


# ---- compute ----------------------------------------------------------------------------------


def matmul_flops_probe(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> Measurement:
    """FLOP/s of a jitted n x n x n matmul (2 n^3 FLOPs), XLA's threads, wall clock."""
    import jax

    rng = np.random.default_rng(1)
    a = jax.device_put(rng.standard_normal((n, n), dtype=np.float32)).astype(dtype)
    b = jax.device_put(rng.standard_normal((n, n), dtype=np.float32)).astype(dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    times = _timed(lambda: matmul(a, b).block_until_ready(), repeats)
    return Measurement.of(2 * n ** 3 / times, "FLOP/s",
                          f"jax.jit {n}x{n} @ {n}x{n} {dtype}, wall clock, median of {repeats}",
                          n=n, dtype=dtype)


def matvec_probe(d_in: int, d_out: int, repeats: int = 25) -> Measurement:
    """Weight bytes per second of a jitted batch-1 float32 product [1, d_in] @ [d_in, d_out]
    (the layout of stagejax's projections), weights resident in memory."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    w = jax.device_put(rng.standard_normal((d_in, d_out), dtype=np.float32))
    x = jax.device_put(rng.standard_normal((1, d_in), dtype=np.float32))
    matvec = jax.jit(lambda x, w: jnp.einsum("TD,DF->TF", x, w))
    times = _timed(lambda: matvec(x, w).block_until_ready(), repeats, warmup=2)
    nbytes = d_in * d_out * 4
    return Measurement.of(nbytes / times, "bytes/s",
                          f"jax.jit [1,{d_in}] @ [{d_in},{d_out}] float32 ({nbytes / 2**20:.1f} MiB "
                          f"of weights), wall clock, median of {repeats}",
                          d_in=d_in, d_out=d_out, seconds=float(np.median(times)))


def call_overhead_probe(calls: int = 100, repeats: int = 21) -> Measurement:
    """Seconds per call of a small jitted stage called the way the staged executor calls one:
    a donated dict of activations, a read-only dict, one weight as an aligned host array, a
    context dict of scalars and an index vector; the caller builds the dicts, blocks on the
    result and merges it back (the per-group cost the roofline adds per call). Median over
    batches of `calls` calls."""
    import jax
    import jax.numpy as jnp

    def stage(mut, const, weights, ctx, index):
        q = mut["q"] + jnp.einsum("td,dh->th", const["h"], weights[0])[:, None, :] * ctx["scale"]
        return {"q": q + index[0].astype(q.dtype)}

    run = jax.jit(stage, donate_argnums=(0,))
    weight = aligned_empty(16 * 8 * 4).view(np.float32).reshape(16, 8)
    weight.fill(0.5)
    state = {"q": jnp.zeros((1, 1, 8)), "h": jnp.ones((1, 16)), "x": jnp.ones((1, 16))}
    ctx = {"scale": jnp.float32(1.0), "past_len": jnp.int32(0), "last": jnp.int32(0)}
    index = jnp.zeros((1,), jnp.int32)
    written, read_only = ("q",), ("h",)

    def batch():
        for _ in range(calls):
            out = run({e: state[e] for e in written}, {e: state[e] for e in read_only},
                      (weight,), ctx, index)
            out["q"].block_until_ready()
            state.update(out)

    batch()  # compiles
    times = _timed(batch, repeats) / calls
    return Measurement.of(times, "s", f"a jitted stage called as the staged executor calls one "
                          f"(donated state dict, host weight, context dict), blocking on each; "
                          f"median over {repeats} batches of {calls} calls", calls=calls)


def executor_overhead_probe(cache_dir: Path, steps: int = 30, repeats: int = 7) -> Measurement:
    """Seconds per group of the staged executor's own cost: an `atomic` decode step of the
    random `tiny` preset (84 groups whose compute and weights are negligible), KV on disk,
    prefetch depth 2, divided by its group count — the prefetcher hand-off, the executable
    call, blocking, releasing, KV block reads and flushes, all of it. Median over batches."""
    import jax

    from stagejax.executor import StagedDecoder  # the executor is what is measured
    from stagejax.kv_cache import KVLayout
    from stagejax.loading import open_model
    from stagejax.stages import ChunkLayout
    from stagejax.store import WeightStore, convert_checkpoint

    jax.config.update("jax_cpu_enable_async_dispatch", False)  # as runs do
    handle = open_model("tiny")
    path = convert_checkpoint(handle, cache_dir, ffn_chunks=3, vocab_chunk=64, progress=False)
    with WeightStore(path, verify="off", expect_config=handle.config) as store:
        layout = ChunkLayout(tuple(store.manifest.ffn_chunk_bounds), tuple(store.manifest.vocab_chunk_bounds))
        decoder = StagedDecoder(handle.config, store, layout, "atomic", KVLayout("disk", "head_major", 32),
                                capacity=64, prefill_block=16, prefetch_depth=2, kv_block=32)
        try:
            decoder.prefill(list(range(16)))
            position = [16]

            def batch():
                for _ in range(steps):
                    decoder.step(3, position[0] % 48 + 16)
                    position[0] += 1

            batch()
            groups = len(decoder.groups)
            times = _timed(batch, repeats) / (steps * groups)
        finally:
            decoder.close()
    return Measurement.of(times, "s", f"staged executor: an atomic decode step of the tiny preset "
                          f"({groups} groups, negligible compute), per group, median over {repeats} "
                          f"batches of {steps} steps", groups=groups)


# ---- storage ----------------------------------------------------------------------------------


def _read_file(fd: int, size: int, buffer: np.ndarray) -> int:
    view = memoryview(buffer)
    done = 0
    while done < size:
        got = os.preadv(fd, [view[:min(len(view), size - done)]], done)
        if got <= 0:
            raise OSError(f"short read at offset {done} of {size}")
        done += got
    return done


def storage_probe(directory: Path, n_bytes: int = 256 << 20, repeats_cold: int = 3,
                  repeats_warm: int = 5, chunk_bytes: int = 8 << 20) -> tuple[Measurement, Measurement]:
    """(cold, warm) sequential read rates of a temporary file in `directory`.

    Cold: the file's pages dropped with posix_fadvise(DONTNEED) before each read, so every byte
    comes from the storage device. Warm: read again at once, a page-cache copy into a reused
    64-byte-aligned buffer with os.preadv (as the weight store reads).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".storage-probe-{os.getpid()}.bin"
    try:
        with open(path, "wb") as handle:
            block = _distinct_pages(chunk_bytes).view(np.uint8)
            for offset in range(0, n_bytes, chunk_bytes):
                block[:8] = np.frombuffer(offset.to_bytes(8, "little"), np.uint8)  # distinct blocks
                handle.write(block[:min(chunk_bytes, n_bytes - offset)].tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        buffer = aligned_empty(chunk_bytes)
        fd = os.open(path, os.O_RDONLY)
        try:
            def cold():
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                start = time.perf_counter()
                _read_file(fd, n_bytes, buffer)
                return time.perf_counter() - start

            cold_s = np.asarray([cold() for _ in range(repeats_cold)])
            warm_s = _timed(lambda: _read_file(fd, n_bytes, buffer), repeats_warm)
        finally:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    how = f"{n_bytes >> 20} MiB file in {directory}, os.preadv in {chunk_bytes >> 20} MiB chunks"
    return (Measurement.of(n_bytes / cold_s, "bytes/s", f"cold (posix_fadvise DONTNEED first), {how}, "
                           f"median of {repeats_cold}", n_bytes=n_bytes),
            Measurement.of(n_bytes / warm_s, "bytes/s", f"warm page cache into a reused aligned "
                           f"buffer, {how}, median of {repeats_warm}", n_bytes=n_bytes))


def contended_probe(directory: Path, copy_bytes: int = 128 << 20, matrix_shape=(2048, 8192),
                    repeats: int = 5, chunk_bytes: int = 4 << 20) -> tuple[Measurement, Measurement]:
    """(copy, matvec): the fraction of its rate alone that each keeps while both run at once,
    as a streamed plan runs them — a thread copying a warm file into a ring of three reused
    aligned buffers (the prefetcher's page-cache reads) while the calling thread runs jitted
    batch-1 matvecs over resident weights (the executor's compute). They share the cores and
    the memory bus. Fractions, not rates, because runs measure their own page-cache rate on
    their checkpoint (`WeightStore.warm_read_rate`) and scale it.

    Each repeat times both alone, then the matvecs over about `copy_bytes` of concurrent
    copying; the concurrent copy rate counts the chunks that finished inside that window."""
    import threading

    import jax
    import jax.numpy as jnp

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".contended-probe-{os.getpid()}.bin"
    rng = np.random.default_rng(3)
    d_in, d_out = matrix_shape
    w = jax.device_put(rng.standard_normal((d_in, d_out), dtype=np.float32))
    x = jax.device_put(rng.standard_normal((1, d_in), dtype=np.float32))
    matvec = jax.jit(lambda x, w: jnp.einsum("TD,DF->TF", x, w))
    matvec(x, w).block_until_ready()
    matvec_bytes = d_in * d_out * 4
    calls = max(2, copy_bytes // matvec_bytes * 2)
    try:
        with open(path, "wb") as handle:
            block = _distinct_pages(chunk_bytes).view(np.uint8)
            for offset in range(0, copy_bytes, chunk_bytes):
                block[:8] = np.frombuffer(offset.to_bytes(8, "little"), np.uint8)
                handle.write(block.tobytes())
        fd = os.open(path, os.O_RDONLY)
        buffers = [aligned_empty(chunk_bytes) for _ in range(3)]

        def copy_chunk(i: int) -> None:
            os.preadv(fd, [memoryview(buffers[i % 3])], (i * chunk_bytes) % copy_bytes)

        def matvecs() -> float:
            start = time.perf_counter()
            for _ in range(calls):
                matvec(x, w).block_until_ready()
            return time.perf_counter() - start

        try:
            for i in range(copy_bytes // chunk_bytes):  # warm the page cache
                copy_chunk(i)
            copy_fractions, matvec_fractions = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                for i in range(copy_bytes // chunk_bytes):
                    copy_chunk(i)
                copy_alone = copy_bytes / (time.perf_counter() - start)
                matvec_alone = calls * matvec_bytes / matvecs()
                stop = threading.Event()
                done: list[float] = []  # end time of each copied chunk

                def copy_loop():
                    i = 0
                    while not stop.is_set():
                        copy_chunk(i)
                        done.append(time.perf_counter())
                        i += 1

                thread = threading.Thread(target=copy_loop, daemon=True)
                thread.start()
                while not done:  # the copy is running before the window opens
                    time.sleep(0.001)
                start = time.perf_counter()
                elapsed = matvecs()
                end = start + elapsed
                stop.set()
                thread.join()
                inside = sum(1 for t in done if start < t <= end)
                copy_fractions.append(inside * chunk_bytes / elapsed / copy_alone)
                matvec_fractions.append(calls * matvec_bytes / elapsed / matvec_alone)
        finally:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    how = (f"rate while both run / rate alone: a thread os.preadv-copying a warm "
           f"{copy_bytes >> 20} MiB file in {chunk_bytes >> 20} MiB chunks into 3 reused aligned "
           f"buffers, and jax.jit [1,{d_in}] @ [{d_in},{d_out}] float32 matvecs in the calling "
           f"thread; median of {repeats}")
    return (Measurement.of(copy_fractions, "fraction", f"page-cache copy, {how}"),
            Measurement.of(matvec_fractions, "fraction", f"matvec, {how}"))


# ---- the calibration record -------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """The cache key of this machine: hostname, CPU model and jax version, file-name safe."""
    import jax

    raw = f"{socket.gethostname()}-{cpu_model()}-jax{jax.__version__}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("_")


def calibration_path(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir) / "calibration" / f"{machine_key()}.json"


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def last_level_cache_bytes() -> float | None:
    """The largest CPU cache's size from sysfs (Linux), or None if it cannot be read."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}
        sizes.append(float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text))
    return max(sizes) if sizes else None


def run_probes(cache_dir: Path, *, quick: bool = False,
               progress: Callable[[str], None] | None = None) -> dict[str, Measurement]:
    """Every probe of the calibration; `quick` uses smaller sizes and fewer repeats."""
    say = progress or (lambda message: None)
    probes: dict[str, Measurement] = {}
    say("memory read bandwidth")
    probes["mem_read"] = memory_read_probe(256 << 20 if quick else 512 << 20, 5 if quick else 9)
    say("float32 matmul")
    probes["matmul_f32_1024"] = matmul_flops_probe(1024, "float32", 5 if quick else 9)
    if not quick:
        probes["matmul_f32_2048"] = matmul_flops_probe(2048, "float32", 5)
    say("bfloat16 matmul")
    probes["matmul_bf16_1024"] = matmul_flops_probe(1024, "bfloat16", 3)
    say("matvec")
    # SmolLM2's FFN projection (3.5 MiB, cache-resident when repeated), a 64 MiB projection and
    # SmolLM2's LM head (108 MiB): the last two stream from memory as decode does.
    probes["matvec_576x1536"] = matvec_probe(576, 1536, 51 if quick else 101)
    probes["matvec_2048x8192"] = matvec_probe(2048, 8192, 9 if quick else 15)
    if not quick:
        probes["matvec_576x49152"] = matvec_probe(576, 49152, 11)
    say("storage")
    cold, warm = storage_probe(cache_dir / "calibration", 256 << 20, 2 if quick else 3,
                               3 if quick else 5)
    probes["storage_cold"], probes["storage_warm"] = cold, warm
    say("copy and compute at once")
    probes["copy_contended"], probes["matvec_contended"] = contended_probe(
        cache_dir / "calibration", 64 << 20 if quick else 128 << 20, repeats=3 if quick else 5)
    say("call overhead")
    probes["jit_call_overhead"] = call_overhead_probe(100, 11 if quick else 21)
    say("executor overhead per group")
    probes["call_overhead"] = executor_overhead_probe(cache_dir, 20 if quick else 30, 5 if quick else 7)
    return probes


def device_from_probes(probes: dict[str, Measurement], *, source: str,
                       name: str = "this_machine") -> Device:
    """The roofline constants from a calibration's probes.

    float32 peak: the largest matmul measured; weight streaming (`matvec_bytes_per_s`): the
    median of the out-of-cache matvecs; memory bandwidth: the single-thread read probe.
    """
    f32 = [m.value for k, m in probes.items() if k.startswith("matmul_f32")]
    streaming = [m.value for k, m in probes.items()
                 if k.startswith("matvec_") and k != "matvec_576x1536"]
    flops = {"float32": max(f32)}
    if "matmul_bf16_1024" in probes:
        flops["bfloat16"] = probes["matmul_bf16_1024"].value
    notes = {k: f"{m.how}; spread (IQR/median) {m.spread:.1%}" for k, m in probes.items()}
    return Device(name=name, flops_per_s=flops,
                  mem_read_bytes_per_s=probes["mem_read"].value,
                  storage_read_bytes_per_s=probes["storage_cold"].value,
                  storage_warm_bytes_per_s=probes["storage_warm"].value,
                  call_overhead_s=probes["call_overhead"].value,
                  ram_bytes=float(_ram_bytes()), source=source,
                  matvec_bytes_per_s=float(np.median(streaming)) if streaming else None,
                  llc_bytes=last_level_cache_bytes(),
                  copy_contended_fraction=_fraction(probes, "copy_contended"),
                  matvec_contended_fraction=_fraction(probes, "matvec_contended"),
                  notes=notes)


def _fraction(probes: dict[str, Measurement], key: str) -> float:
    """A contention fraction, capped at 1 (noise can make the pair look faster than alone)."""
    return min(1.0, probes[key].value) if key in probes else 1.0


def _device_from_dict(data: dict) -> Device:
    return Device(**{**data, "flops_per_s": dict(data["flops_per_s"]), "notes": dict(data.get("notes", {}))})


def load_calibration(path: str | os.PathLike) -> dict:
    """A calibration record: {"format", "machine", "quick", "date", "device", "probes"}."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        record["device"] = _device_from_dict(record["device"])
        record["probes"] = {k: Measurement(**m) for k, m in record["probes"].items()}
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a stagejax calibration record ({error!r}); delete it or "
                         f"recalibrate with force=True") from None
    return record


def calibrate(cache_dir: str | os.PathLike, *, force: bool = False, quick: bool = False,
              progress: Callable[[str], None] | None = None) -> Device:
    """The roofline `Device` of this machine, measured once and cached per machine.

    A cached record is reused unless `force`, its format is older, or it was a `quick`
    calibration and a full one is asked for. The record (JSON) keeps every probe's median,
    spread, best/worst and method beside the device constants.
    """
    path = calibration_path(cache_dir)
    if path.exists() and not force:
        try:
            record = load_calibration(path)
        except ValueError:
            record = None
        if record and record.get("format") == CALIBRATION_FORMAT and (quick or not record["quick"]):
            return record["device"]
    import jax

    from stagejax.store.checkpoints import cache_dir_error, make_dir

    make_dir(Path(cache_dir) / "calibration", Path(cache_dir))  # before a minute of probes
    try:  # the probes write files under cache_dir, and the record goes there
        probes = run_probes(Path(cache_dir), quick=quick, progress=progress)
        now = datetime.datetime.now(datetime.timezone.utc)
        host = socket.gethostname()
        device = device_from_probes(
            probes, source=f"calibrated on {host} ({cpu_model()}, {os.cpu_count()} cores, jax "
                           f"{jax.__version__}) {now:%Y-%m-%d %H:%M} UTC{' (quick)' if quick else ''}")
        atomic_write_json(path, {
            "format": CALIBRATION_FORMAT, "machine": machine_key(), "quick": quick,
            "date": now.isoformat(timespec="seconds"), "device": device.to_dict(),
            "probes": {k: dataclasses.asdict(m) for k, m in probes.items()}})
    except OSError as error:
        raise cache_dir_error(Path(cache_dir), error, "calibrate this machine (its probes and "
                              "record are written there)") from error
    return device
