"""One run of the main job: convert, plan, compile, generate, evaluate perplexity, write metrics.

`run_experiment(settings, out_dir)` is what `python -m stagejax.run` calls after composing its
hydra config; it is equally usable from Python. Metric names follow design §7.

Phases, in order (so every memory figure means what design §7 says; each is announced in the
run directory's `phase.json`, which a job killed under a memory cap leaves behind):
  1. `open`, `convert`: describe the model, find or make its stage-shard checkpoint (cached);
  2. `compile`: compile every executable from shapes and run each once on zero weights (staged:
     a prefill pass and a step; `model`: prefill, step and the scorer on one shared zero
     buffer per weight shape) — then `baseline_rss_bytes`, the runtime's own cost, before any
     weight is loaded: the same point for every schedule;
  3. `load`: the plan's resident weights are read (`model`: every weight); streamed plans
     read theirs group by group as they run (`stagejax.engine`: one protocol for both);
  4. `prefill`, then `decode`: the RSS high-water mark is reset and the decode steps are timed
     (`decode_peak_rss_bytes` is that phase's absolute high-water RSS — what a device must
     hold —, `decode_working_set_bytes` the same above the baseline);
  5. `timeline`: one more, untimed, instrumented decode step records the per-group memory;
  6. `perplexity` through the schedule's own path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax

from stagejax import compile_cache, data
from stagejax_device import measure
from stagejax.decode import run_generation, sampling_keys
from stagejax.engine import ScheduleRun
from stagejax.loading import open_model, release_freed_memory, use_one_malloc_arena
from stagejax.evaluation import perplexity_llama_cpp, perplexity_strided, tokens_scored
from stagejax_device.results import atomic_write_json, atomic_write_text
from stagejax.sampling import SamplingConfig
from stagejax.scheduler import RESIDENT_POLICIES, GroupPlan, streams_weights
from stagejax.settings import RunSettings
from stagejax.store import WeightStore, convert_checkpoint, find_checkpoint
from stagejax.store.convert import resolve_cache_dir


log = logging.getLogger(__name__)

# metrics.json's table version (design §7); 2: the absolute decode peak is the headline,
# `peak_rss_decode_bytes` became `decode_working_set_bytes` (kept as an alias), the baseline is
# taken after every schedule's warm-up. `stagejax.report` reads both.
METRICS_SCHEMA_VERSION = 2


def live_jax_bytes() -> int:
    """Bytes held by live JAX arrays (on CPU `memory_stats()` is None, so count arrays)."""
    return sum(array.nbytes for array in jax.live_arrays())


def cache_option(settings: RunSettings) -> str:
    """The cache as design §6 names its options: ram, disk, disk_bf16, disk_int8."""
    short = {"float32": "", "bfloat16": "_bf16", "int8": "_int8"}[settings.cache.dtype]
    return settings.cache.kind + short


def prompt_ids(tokenizer, settings: RunSettings) -> list[int]:
    prompt = settings.decode.prompt
    if settings.decode.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def record_timeline(run: ScheduleRun, position: int, token: int) -> dict:
    """One untimed, instrumented decode step.

    Returns {"groups": per group the RSS after it, the high-water RSS while it ran (mark reset
    before each group), live JAX bytes, the planned peak, and its start/end/io-wait seconds
    relative to the step's start; "loads": the prefetcher's reads during the step (unit's
    group, start, end, bytes)}.
    """
    plan = run.plan()
    engine = run.engine
    records: list[dict] = []
    origin = 0.0  # set just before the step

    def observe(gi, group, start, end, wait):
        records.append({"group": group.id, "start_s": start - origin, "end_s": end - origin,
                        "elapsed_s": end - start, "io_wait_s": wait,
                        "rss_bytes": measure.rss_bytes(), "peak_rss_bytes": measure.peak_rss_bytes(),
                        "live_jax_bytes": live_jax_bytes(),
                        "planned_peak_bytes": plan[gi].peak_bytes})
        measure.reset_peak_rss()

    loads = hasattr(engine.prefetcher, "load_log")
    log: list = []
    if loads:
        engine.prefetcher.load_log = log
    measure.reset_peak_rss()
    engine.observer = observe
    origin = time.perf_counter()
    try:
        engine.step(token, position)
    finally:
        engine.observer = None
        if loads:
            engine.prefetcher.load_log = None
    streamed = [g for g in engine.groups if streams_weights(g)]
    first_unit = getattr(engine.prefetcher, "first_unit_of_read", lambda read: read)
    return {"groups": records,  # a load names the first group of the units it read together
            "loads": [{"group": streamed[first_unit(read)].id, "start_s": start - origin,
                       "end_s": end - origin, "bytes": nbytes} for read, start, end, nbytes in log]}


def _prepare(settings: RunSettings, progress: bool, phases=None):
    """What the compile phase needs: the model opened, the prompt encoded (settings resolved:
    the perplexity context), the stage shards converted (cached) and opened. Returns
    (handle, config, prompt ids, settings, sampling, store, KV capacity)."""
    enter = phases.enter if phases is not None else (lambda phase: None)
    handle = open_model(settings.model.name, settings.model.path, settings.seed)
    config = handle.config
    ids = prompt_ids(handle.tokenizer, settings)
    max_new = settings.decode.max_new_tokens
    if len(ids) + max_new + 1 > config.max_seq_len:
        raise ValueError(f"prompt of {len(ids)} tokens + decode.max_new_tokens={max_new} exceeds "
                         f"the model's context of {config.max_seq_len} tokens")
    if not ids:
        raise ValueError("the prompt encodes to no tokens: give decode.prompt some text")
    n_ctx = settings.eval.context(config.max_seq_len) if settings.eval.ppl_chunks else None
    settings = dataclasses.replace(settings, eval=dataclasses.replace(settings.eval, n_ctx=n_ctx))
    sampling = SamplingConfig(settings.decode.temperature, settings.decode.top_k, settings.decode.top_p)

    enter("convert")
    where = (handle, settings.paths.cache, settings.schedule.ffn_chunks,
             settings.schedule.vocab_chunk, settings.quant.scheme)
    checkpoint = find_checkpoint(*where)
    if checkpoint is None and settings.convert_in_helper and not _IN_HELPER:
        convert_in_helper(settings, progress)
        checkpoint = find_checkpoint(*where)
    if checkpoint is None:  # no helper, or it failed: convert here
        checkpoint = convert_checkpoint(*where, progress=progress)
    release_freed_memory()
    store = WeightStore(checkpoint, verify=settings.store.verify, expect_config=config,
                        drop_page_cache=settings.store.drop_page_cache)
    capacity = max(len(ids) + max_new + 1, n_ctx if settings.eval.ppl_chunks else 0)
    return handle, config, ids, settings, sampling, store, capacity


def _source_digest() -> str:
    """sha256 of stagejax's and the runtime's Python sources: executables compiled by other
    code are other executables."""
    digest = hashlib.sha256()
    for package in (Path(__file__).resolve().parent, Path(measure.__file__).resolve().parent):
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _run_helper(flag: str, settings: RunSettings, what: str) -> float | None:
    """`python -m stagejax.experiment <flag> <settings>` in a child process; its seconds, or
    None (with a warning naming `what`) if it failed — the caller then does the work itself,
    and meets the error itself, with its own message."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stagejax-helper-") as scratch:
        job = Path(scratch) / "settings.pkl"
        job.write_bytes(pickle.dumps(settings))
        done = subprocess.run([sys.executable, "-m", "stagejax.experiment", flag, str(job)],
                              capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        log.warning("%s in a helper process failed (%s); doing it in this one", what,
                    lines[-1] if lines else f"exit code {done.returncode}")
        return None
    return time.perf_counter() - start


def convert_in_helper(settings: RunSettings, progress: bool = True) -> float | None:
    """Convert the run's model into the cache in a helper process; returns its seconds (None
    if it failed). The source's reading (a GGUF dequantized to float32, the tokenizer's
    metadata) leaves heap and Python objects behind in the process that converts, which are not
    the runtime's cost: a first run that converted in-process held a baseline tens of MB above
    a later run's."""
    if progress:
        print(f"converting {settings.model.name} ({settings.quant.scheme}) into the stage-shard "
              f"cache, once, in a helper process", file=sys.stderr, flush=True)
    return _run_helper("--convert", settings, "converting the model")


def _convert_only(job: Path) -> None:
    """The helper of `convert_in_helper`: open the model and convert it, nothing else."""
    settings = pickle.loads(job.read_bytes())
    handle = open_model(settings.model.name, settings.model.path, settings.seed)
    convert_checkpoint(handle, settings.paths.cache, settings.schedule.ffn_chunks,
                       settings.schedule.vocab_chunk, settings.quant.scheme, progress=False)


def fill_compile_cache(settings: RunSettings) -> float | None:
    """Compile this run's executables in a helper process, into the persistent cache, unless
    this configuration (settings, sources, JAX version) was compiled before; returns the
    helper's seconds (None: not needed). The run then loads every executable from the cache:
    XLA's compiler leaves tens of MB behind in the process that compiles (SmolLM2 `atomic`:
    a first run's baseline 38.5 MiB above a later one's), which are not the runtime's cost.
    A helper that fails is reported and the run compiles for itself."""
    key = hashlib.sha256("\n".join([
        json.dumps(dataclasses.asdict(settings), sort_keys=True, default=str),
        jax.__version__, _source_digest()]).encode()).hexdigest()[:32]
    marker = resolve_cache_dir(settings.paths.cache) / "xla" / "compiled" / key
    if marker.exists():
        return None
    seconds = _run_helper("--fill-compile-cache", settings, "compiling")
    if seconds is None:
        return None
    marker.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"model": settings.model.name,
                                          "schedule": settings.schedule.policy}) + "\n")
    return seconds


def _compile_only(job: Path) -> None:
    """The helper of `fill_compile_cache`: the run's compile phase, and nothing after it."""
    settings = pickle.loads(job.read_bytes())
    compile_cache.use_persistent_cache(resolve_cache_dir(settings.paths.cache))
    use_one_malloc_arena()
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    handle, _, ids, settings, sampling, store, capacity = _prepare(settings, progress=False)
    try:
        run = ScheduleRun(settings, handle, store, capacity, len(ids), sampling)
        sampling_keys(settings.seed, settings.decode.max_new_tokens)
        run.close()
    finally:
        store.close()


def run_experiment(settings: RunSettings, out_dir: str | Path, progress: bool = True,
                   on_decode_start: Callable[[int], None] | None = None) -> dict:
    """Run the configured job and write `metrics.json` (atomically) into `out_dir`.
    `on_decode_start(baseline_rss_bytes)` is called just before the timed decode (e.g. to
    tighten a memory cap around the decode's working set)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    phases = measure.PhaseLog(out_dir / measure.PHASE_FILE)
    phases.enter("open")
    if settings.compile_cache:
        compile_cache.use_persistent_cache(resolve_cache_dir(settings.paths.cache))
    use_one_malloc_arena()
    # Run each executable inline in the calling thread: a staged step makes ~1,200 small calls
    # and blocks on each, so the hand-off to a dispatch thread is pure latency (SmolLM2 atomic:
    # 154 -> 118 ms/token; the monolithic step got faster too).
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    peak = measure.PeakRss()
    wall_start = time.perf_counter()

    prepared = _prepare(settings, progress, phases)
    handle, config, ids, settings, sampling, store, capacity = prepared
    checkpoint = store.path
    max_new = settings.decode.max_new_tokens
    n_ctx = settings.eval.n_ctx
    phases.enter("compile")
    # The resident plan's few executables leave nothing measurable behind (SmolLM2 `model`: a
    # compiling run's baseline 334.5 MiB, a cached one's 334.7): only streamed plans need it.
    helper_s = (fill_compile_cache(settings) if settings.compile_cache and settings.compile_in_helper
                and settings.schedule.policy not in RESIDENT_POLICIES else None)
    compiled_from = compile_cache.counters()
    run = ScheduleRun(settings, handle, store, capacity, len(ids), sampling, progress)
    keys = sampling_keys(settings.seed, max_new)  # compiles: before the baseline
    release_freed_memory()
    baseline_rss = measure.rss_bytes()
    compiled = compile_cache.counters().since(compiled_from)

    phases.enter("load")
    run.engine.load()
    session = run.engine
    decode_io = {}

    def before_decode():
        decode_io["first_token_age_s"] = measure.process_age_s()
        decode_io["prefill_peak"] = peak.phase_peak_bytes()
        run.engine.release_pass_buffers(keep_tokens=1)
        release_freed_memory()  # prefill's freed temporaries are not the decode's working set
        phases.enter("decode")
        peak.start_phase()
        decode_io["start"] = run.engine.io_counters()
        if on_decode_start is not None:
            on_decode_start(baseline_rss)

    phases.enter("prefill")
    peak.start_phase()
    generation = run_generation(session, ids, max_new, settings.seed, config.eos_token_id,
                                handle.tokenizer.decode, run.compile_s, before_decode=before_decode,
                                keys=keys)
    peak_decode = peak.phase_peak_bytes()
    bytes_end, wait_end = run.engine.io_counters()
    bytes_start, wait_start = decode_io.get("start", (bytes_end, wait_end))
    steps = max(generation.n_decode_steps, 1)
    phases.enter("timeline")
    timeline = record_timeline(run, len(ids) + len(generation.new_ids) - 1, generation.new_ids[-1])
    plan = run.plan()

    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "model": settings.model.name,
        "schedule": settings.schedule.policy,
        "quant": settings.quant.scheme,
        "cache": cache_option(settings),
        "cache_dtype": settings.cache.dtype,
        "cache_order": settings.cache.order,
        "decode_peak_rss_bytes": peak_decode,
        "baseline_rss_bytes": baseline_rss,
        "decode_working_set_bytes": peak_decode - baseline_rss,
        "peak_rss_decode_bytes": peak_decode - baseline_rss,  # the working set's earlier name
        "planned_peak_bytes": max(row.peak_bytes for row in plan),
        "prefill_peak_rss_bytes": decode_io.get("prefill_peak"),
        "prefill_working_set_bytes": decode_io["prefill_peak"] - baseline_rss if "prefill_peak" in decode_io else None,
        "n_stages": run.n_stages,
        "n_groups": run.n_groups,
        "compile_s": run.compile_s,
        "compile_helper_s": helper_s,
        "compile_trace_s": compiled.trace_s, "compile_lower_s": compiled.lower_s,
        "compile_backend_s": compiled.backend_s, "compile_cache_hits": compiled.cache_hits,
        "compile_cache_misses": compiled.cache_misses,
        "n_executables": run.n_executables,
        "decode_tokens_per_s": generation.decode_tokens_per_s,
        "prefill_tokens_per_s": generation.prefill_tokens_per_s,
        "time_to_first_token_s": generation.time_to_first_token_s,
        "exec_to_first_token_s": decode_io.get("first_token_age_s"),
        "io_wait_frac": (wait_end - wait_start) / generation.decode_s if generation.decode_s else 0.0,
        "bytes_streamed_per_token": (bytes_end - bytes_start) / steps,
        "n_decode_steps": generation.n_decode_steps,
        "prompt_tokens": len(ids),
        "generated_tokens": len(generation.new_ids),
        "generated_text": generation.text,
        "generated_ids": [int(t) for t in generation.new_ids],
        "timeline_peak_rss_above_baseline_bytes": max(r["peak_rss_bytes"] for r in timeline["groups"]) - baseline_rss,
        "checkpoint": str(checkpoint),
        "weight_bytes": store.manifest.nbytes,
    }

    measured_step = 1 / generation.decode_tokens_per_s if generation.decode_tokens_per_s else float("nan")
    planned = run.planned
    for name, pass_plan in planned.passes.items():
        metrics[f"planned_{name}_peak_bytes"] = pass_plan.peak_bytes
    metrics.update(predicted_step_s=planned.predicted_step_s,
                   predicted_pipeline_step_s=planned.pipeline_step_s,
                   measured_step_s=measured_step, device=run.planner_context.device.name)
    if run.checkpoint_read_bytes_per_s is not None:
        metrics["checkpoint_warm_read_bytes_per_s"] = run.checkpoint_read_bytes_per_s

    if settings.eval.ppl_chunks:
        phases.enter("perplexity")
        release_freed_memory()
        peak.start_phase()  # the text, its tokens and the scoring passes: the phase's working set
        # Read and encoded in pieces, only as far as the tokens scored: neither the whole text
        # nor its whole encoding is ever held.
        text = data.iter_text(settings.eval.dataset, settings.paths.data, settings.eval.text_mode)
        tokens = handle.tokenizer.encode_array(text, tokens_scored(
            settings.eval.procedure, n_ctx, settings.eval.ppl_chunks, settings.eval.stride))
        text.close()
        release_freed_memory()  # the reading's buffers, before the passes that the plan bounds
        scoring_compiles_from = compile_cache.counters()
        nll_fn = run.nll_fn()
        if settings.eval.procedure == "llama_cpp":
            result = perplexity_llama_cpp(nll_fn, tokens, n_ctx, settings.eval.ppl_chunks, progress)
        else:
            result = perplexity_strided(nll_fn, tokens, n_ctx, settings.eval.stride,
                                        settings.eval.ppl_chunks, progress)
        metrics.update(ppl=result.ppl, ppl_stderr=result.ppl_stderr, ppl_chunks=result.n_chunks,
                       n_ctx=n_ctx, ppl_procedure=result.procedure,
                       ppl_scored_tokens=result.n_scored_tokens,
                       ppl_text_mode=settings.eval.text_mode,
                       ppl_peak_rss_bytes=peak.phase_peak_bytes())
        scoring_compiles = compile_cache.counters().since(scoring_compiles_from)
        metrics["ppl_compile_cache_misses"] = scoring_compiles.cache_misses
        metrics["ppl_compile_cache_hits"] = scoring_compiles.cache_hits
        metrics["ppl_working_set_bytes"] = metrics["ppl_peak_rss_bytes"] - baseline_rss

    phases.enter("write")
    metrics["peak_rss_bytes"] = max(peak.overall_bytes, measure.peak_rss_bytes())
    metrics.update(measure.cgroup_memory() or {})
    metrics["wall_s"] = time.perf_counter() - wall_start
    if hasattr(run.engine, "warmup_s"):
        metrics["warmup_s"] = run.engine.warmup_s
    run.close()
    store.close()
    atomic_write_json(out_dir / "plan.json", plan_records(run, plan, timeline))
    atomic_write_json(out_dir / "timeline.json", timeline)
    atomic_write_json(out_dir / "resolved_settings.json", dataclasses.asdict(settings))
    atomic_write_json(out_dir / "metrics.json", metrics)
    phases.enter("done")
    return metrics


def plan_records(run: ScheduleRun, plan: list[GroupPlan], timeline: dict) -> list[dict]:
    """plan.json: per group the budget accounting, the roofline's FLOPs and
    predicted seconds beside the instrumented step's measured seconds (`measured_s`; that step
    samples RSS between groups, so its prefetch runs further ahead than in the timed steps) and
    the XLA temporaries its compiled decode executables need (`compiled_scratch_bytes`) beside
    the plan's bound of them (`scratch_bytes`)."""
    rows = [dataclasses.asdict(row) | {"peak_bytes": row.peak_bytes} for row in plan]
    measured = {r["group"]: r["elapsed_s"] for r in timeline["groups"]}
    compiled_scratch = run.engine.temp_bytes()
    for row, planned, scratch in zip(rows, run.planned.rows, compiled_scratch):
        if planned.group_id != row["group_id"] or planned.peak_bytes != row["peak_bytes"]:
            raise AssertionError(f"planner and executor disagree on group {row['group_id']}: "
                                 f"{planned.peak_bytes} vs {row['peak_bytes']} bytes")
        row.update(stage_ids=list(planned.stage_ids), flops=planned.flops,
                   bytes_moved=planned.bytes_moved,
                   predicted_s=planned.predicted_s, predicted_compute_s=planned.compute_s,
                   predicted_load_s=planned.load_s, measured_s=measured.get(row["group_id"]),
                   compiled_scratch_bytes=scratch)
    return rows


def format_summary(metrics: dict) -> str:
    """A short human-readable summary of a run's metrics."""
    mb = lambda b: f"{b / 2**20:,.1f} MiB"
    lines = [
        f"model {metrics['model']}  schedule {metrics['schedule']}  quant {metrics['quant']}  "
        f"cache {metrics['cache']}  ({metrics['n_stages']} stages in {metrics['n_groups']} groups)",
        f"generated: {json.dumps(metrics['generated_text'])}",
        f"decode peak RSS {mb(metrics['decode_peak_rss_bytes'])} for the whole process (run peak "
        f"{mb(metrics['peak_rss_bytes'])}); working set above the runtime baseline of "
        f"{mb(metrics['baseline_rss_bytes'])}: {mb(metrics['decode_working_set_bytes'])}, planned "
        f"{mb(metrics['planned_peak_bytes'])}",
        f"decode {metrics['decode_tokens_per_s']:.2f} tokens/s, prefill "
        f"{metrics['prefill_tokens_per_s']:.1f} tokens/s, time to first token "
        f"{metrics['time_to_first_token_s'] * 1e3:.1f} ms, compile {metrics['compile_s']:.1f} s",
        f"streamed {mb(metrics['bytes_streamed_per_token'])} per token, I/O wait "
        f"{100 * metrics['io_wait_frac']:.1f}% of decode time",
    ]
    if metrics.get("cgroup_peak_bytes") is not None:
        lines.append(f"cgroup: peak {mb(metrics['cgroup_peak_bytes'])} (page cache charged to it "
                     f"included) under a limit of {mb(metrics['cgroup_limit_bytes'])}")
    if "ppl" in metrics:
        lines.append(f"perplexity {metrics['ppl']:.4f} +/- {metrics['ppl_stderr']:.4f} "
                     f"({metrics['ppl_chunks']} chunks of {metrics['n_ctx']} tokens, "
                     f"{metrics['ppl_procedure']})")
    return "\n".join(lines)


_HELPERS = {"--fill-compile-cache": _compile_only, "--convert": _convert_only}
_IN_HELPER = False  # a helper process converts for itself: no helper of a helper

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in _HELPERS:
        raise SystemExit("usage: python -m stagejax.experiment {--fill-compile-cache,--convert} "
                         "SETTINGS.pkl (the helpers of fill_compile_cache and convert_in_helper)")
    _IN_HELPER = True
    _HELPERS[sys.argv[1]](Path(sys.argv[2]))
