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
  3. `load`: `model` loads every weight (resident); staged schedules stream them per group;
  4. `prefill`, then `decode`: the RSS high-water mark is reset and the decode steps are timed
     (`decode_peak_rss_bytes` is that phase's absolute high-water RSS — what a device must
     hold —, `decode_working_set_bytes` the same above the baseline);
  5. `timeline`: one more, untimed, instrumented decode step records the per-group memory;
  6. `perplexity` through the schedule's own path.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from stagejax import compile_cache, data, roofline
from stagejax_device import measure
from stagejax.decode import (MonolithicSession, decoder_for, run_generation, sampling_keys,
                             token_nll)
from stagejax.executor import StagedDecoder
from stagejax.devices import device_from_settings
from stagejax.kv_cache import (KVLayout, cache_capacity, read_bytes as kv_read_bytes,
                               resident_cache_bytes, stored_row_bytes)
from stagejax.planner import PlanContext, make_plan, warm_group_time
from stagejax.quant import largest_dequantized_bytes
from stagejax.loading import open_model, release_freed_memory, use_one_malloc_arena
from stagejax.evaluation import perplexity_llama_cpp, perplexity_strided, tokens_scored
from stagejax_device.results import atomic_write_json
from stagejax.sampling import SamplingConfig
from stagejax.scheduler import GroupPlan, streams_weights
from stagejax.settings import RunSettings
from stagejax.stages import ChunkLayout, build_stages
from stagejax.store import WeightStore, assemble_params, convert_checkpoint
from stagejax.store.convert import resolve_cache_dir
from stagejax.store.layout import params_spec
from stagejax_device.weight_store import ALIGN_BYTES


# metrics.json's table version (design §7); 2: the absolute decode peak is the headline,
# `peak_rss_decode_bytes` became `decode_working_set_bytes` (kept as an alias), the baseline is
# taken after every schedule's warm-up. `stagejax.report` reads both.
METRICS_SCHEMA_VERSION = 2


def plan_context(settings: RunSettings, config, layout: ChunkLayout, store: WeightStore,
                 kv_layout: KVLayout, capacity: int, device) -> PlanContext:
    """What the planner needs to know about this run's store, cache and machine."""
    schedule = settings.schedule
    arrays = store.manifest.arrays
    kv_block = schedule.kv_block
    rows = cache_capacity(max(capacity, schedule.prefill_block), kv_block)
    # The passes the run makes besides decode steps, over the same groups: the prompt's, and
    # perplexity's when it scores text (StagedDecoder.pass_kinds).
    passes = {(schedule.prefill_block, False)} | ({(schedule.prefill_block, True)}
                                                  if settings.eval.ppl_chunks else set())
    return PlanContext(
        config=config, layout=layout, stored_bytes=store.nbytes,
        slab_bytes_of=lambda keys: sum(-(-arrays[k].nbytes // ALIGN_BYTES) * ALIGN_BYTES for k in keys),
        kv_block_bytes=lambda n_groups: kv_read_bytes(config, kv_layout, n_groups, kv_block),
        kv_layer_bytes=rows * stored_row_bytes(config, kv_layout, config.n_kv_heads),
        prefetch_depth=schedule.prefetch_depth, device=device, kv_len=capacity, kv_block=kv_block,
        past_rows=rows,
        kv_bits=stored_row_bytes(config, kv_layout, 1) * 8 / (2 * config.head_dim),
        kv_on_disk=kv_layout.location == "disk",
        kv_ram_bytes=resident_cache_bytes(config, kv_layout, max(capacity, schedule.prefill_block)),
        dequant_bytes_of=lambda keys: largest_dequantized_bytes(keys, arrays),
        activations_in_ram=schedule.activations == "ram",
        other_passes=tuple(sorted(passes - {(1, False)})))


def live_jax_bytes() -> int:
    """Bytes held by live JAX arrays (on CPU `memory_stats()` is None, so count arrays)."""
    return sum(array.nbytes for array in jax.live_arrays())


def shared_zeros(spec_tree):
    """Zero arrays shaped like `spec_tree`, one buffer per distinct (shape, dtype) shared by every
    leaf of that shape: enough to run an executable once without holding a copy of the model
    (SmolLM2's 30 layers share each projection's buffer). Host zeros handed over by
    `device_put`: `jnp.zeros` would compile a broadcast per shape, for the warm-up alone
    (~7 MB of the baseline on SmolLM2)."""
    buffers = {}

    def zeros(spec):
        key = (tuple(spec.shape), np.dtype(spec.dtype).str)
        if key not in buffers:
            buffers[key] = jax.device_put(np.zeros(spec.shape, spec.dtype))
        return buffers[key]

    return jax.tree_util.tree_map(zeros, spec_tree)


def cache_option(settings: RunSettings) -> str:
    """The cache as design §6 names its options: ram, disk, disk_bf16, disk_int8."""
    short = {"float32": "", "bfloat16": "_bf16", "int8": "_int8"}[settings.cache.dtype]
    return settings.cache.kind + short


def prompt_ids(tokenizer, settings: RunSettings) -> list[int]:
    prompt = settings.decode.prompt
    if settings.decode.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


class ScheduleRun:
    """What differs between `model` and the staged schedules, behind one small interface:
    a decoding session, a scoring function, the plan, and the I/O counters."""

    def __init__(self, settings: RunSettings, handle, store: WeightStore, capacity: int,
                 prompt_len: int, sampling: SamplingConfig, progress: bool = False):
        self.settings, self.store = settings, store
        config = handle.config
        manifest = store.manifest
        self.layout = ChunkLayout(tuple(manifest.ffn_chunk_bounds), tuple(manifest.vocab_chunk_bounds))
        self.n_stages = len(build_stages(config, self.layout))
        self.policy = settings.schedule.policy
        self.config = config
        start = time.perf_counter()
        if self.policy == "model":
            # The stored arrays' shapes: quantized matrices stay quantized (stagejax.quant).
            self.params_spec = params_spec(manifest)
            kv_dtype = settings.cache.dtype  # the resident cache is float32; a lossy dtype is emulated
            self.decoder = decoder_for(config, self.params_spec, prompt_len,
                                       settings.decode.max_new_tokens + 1, sampling, kv_dtype)
            self.nll = None
            # Warm up every executable the run will call before the baseline, as the staged
            # schedules' dry run does (design §7: the same point for every schedule).
            zeros = shared_zeros(self.params_spec)
            self.warmup_s = self.decoder.warm_up(zeros)
            if settings.eval.ppl_chunks:
                self.nll = jax.jit(lambda p, t: token_nll(config, p, t, kv_dtype))
                jax.block_until_ready(self.nll(zeros, np.zeros((1, settings.eval.n_ctx), np.int32)))
            del zeros
            self.n_groups = 1
            # prefill, step, the sampler, the KV writes and the scorer
            self.n_executables = 3 + len(self.decoder._write) + (self.nll is not None)
            self.staged = None
            # The roofline's view of the resident step: its weights read at the matvec rate.
            self.device = device_from_settings(settings.device, settings.paths.cache)
            step = roofline.model_step_cost(config, phase="decode", kv_len=capacity)  # float32 KV
            self.model_predicted_s = warm_group_time(step, self.device, streamed=False, kv_on_disk=False)
        else:
            schedule, cache = settings.schedule, settings.cache
            cache_dir = resolve_cache_dir(settings.paths.cache)
            kv_layout = KVLayout(cache.kind, cache.order, cache.block_tokens or schedule.kv_block,
                                 cache.dtype, settings.paths.scratch or str(cache_dir / "scratch"))
            device = device_from_settings(settings.device, settings.paths.cache)
            self.checkpoint_read_bytes_per_s = None
            if settings.device.calibrated and not settings.store.drop_page_cache:
                # This machine: the streaming time is predicted from this checkpoint's own
                # page-cache read rate, measured now (~0.1 s; it also warms the cache).
                self.checkpoint_read_bytes_per_s = store.warm_read_rate()
                device = dataclasses.replace(device, storage_warm_bytes_per_s=self.checkpoint_read_bytes_per_s)
            # Planned (and validated against schedule.budget_mb) before anything compiles.
            self.planner_context = plan_context(settings, config, self.layout, store, kv_layout,
                                                capacity, device)
            budget = None if schedule.budget_mb is None else int(schedule.budget_mb * 2**20)
            self.planned = make_plan(build_stages(config, self.layout, manifest.arrays), self.policy,
                                     self.planner_context, budget)
            self.staged = StagedDecoder(
                config, store, self.layout, self.policy, kv_layout,
                capacity=capacity, prefill_block=schedule.prefill_block,
                prefetch_depth=schedule.prefetch_depth, sampling=sampling,
                groups=self.planned.groups, kv_block=schedule.kv_block,
                activations=schedule.activations, reader=settings.store.reader,
                scratch_dir=kv_layout.directory, native_dir=str(cache_dir / "native"),
                compile_workers=settings.compile_workers)
            self.n_groups = len(self.staged.groups)
            self.n_executables = self.staged.n_executables
            if progress:
                print(self.planned.table(), flush=True)
            self.staged.dry_run(score=bool(settings.eval.ppl_chunks))
        self.compile_s = time.perf_counter() - start
        self.params = None
        self._session = None

    def load(self) -> None:
        """`model`: read every weight once and keep it resident (the classic baseline)."""
        if self.policy != "model":
            return
        keys = list(self.store.manifest.arrays)
        arrays = self.store.read(keys)
        params = assemble_params(arrays, self.config, list(self.layout.ffn_bounds),
                                 list(self.layout.vocab_bounds))
        # Own copies in the stored dtypes (the buffers go back to the pool); a quantized
        # matrix is dequantized inside the step's jit, not here. A numpy copy handed over by
        # device_put: `jnp.array` would compile a conversion per leaf after the baseline.
        self.params = jax.tree_util.tree_map(lambda a: jax.device_put(np.array(a)), params)
        jax.block_until_ready(self.params)
        self.store.release(arrays)
        del arrays, params
        self.store.clear_pool()
        release_freed_memory()

    def session(self):
        """The decoding session (one per run: it owns the monolithic KV cache)."""
        if self.staged is not None:
            return self.staged
        if self._session is None:
            self._session = MonolithicSession(self.decoder, self.params)
        return self._session

    def nll_fn(self):
        if self.staged is None:
            return lambda window: self.nll(self.params, jnp.asarray(window))
        return lambda window: self.staged.token_nll(window[0])[None]

    def plan(self) -> list[GroupPlan]:
        if self.staged is not None:
            return self.staged.plan()
        # model: every weight resident, the whole KV cache in RAM, one step's activations.
        c = self.config
        weights = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize
                      for s in jax.tree_util.tree_leaves(self.params_spec))
        kv = 2 * c.n_layers * self.decoder.cache_len * c.n_kv_heads * c.head_dim * 4
        activations = 4 * (4 * c.d_model + 2 * c.n_heads * c.head_dim + c.ffn_dim * 3 + c.vocab_size)
        return [GroupPlan("model", "fused", self.n_stages, weights, activations, kv, 0)]

    def io_counters(self) -> tuple[int, float]:
        """(bytes read from storage so far: weights + KV blocks + activations read back with
        schedule.activations=disk, seconds spent waiting for weights and KV)."""
        if self.staged is None:
            return self.store.bytes_read, self.store.io_wait_s
        spilled = self.staged.activation_store
        return (self.store.bytes_read + self.staged.cache.bytes_read
                + (spilled.bytes_read if spilled is not None else 0),
                self.store.io_wait_s + self.staged.kv_wait_s)


def record_timeline(run: ScheduleRun, position: int, token: int) -> dict:
    """One untimed, instrumented decode step.

    Returns {"groups": per group the RSS after it, the high-water RSS while it ran (mark reset
    before each group), live JAX bytes, the planned peak, and its start/end/io-wait seconds
    relative to the step's start; "loads": the prefetcher's reads during the step (unit's
    group, start, end, bytes)}.
    """
    if run.staged is None:
        measure.reset_peak_rss()
        start = time.perf_counter()
        run.session().step(token, position)
        end = time.perf_counter() - start
        return {"groups": [{"group": "model", "start_s": 0.0, "end_s": end, "elapsed_s": end,
                            "io_wait_s": 0.0, "rss_bytes": measure.rss_bytes(),
                            "peak_rss_bytes": measure.peak_rss_bytes(),
                            "live_jax_bytes": live_jax_bytes(),
                            "planned_peak_bytes": run.plan()[0].peak_bytes}], "loads": []}
    plan = run.plan()
    staged = run.staged
    records: list[dict] = []
    origin = 0.0  # set just before the step

    def observe(gi, group, start, end, wait):
        records.append({"group": group.id, "start_s": start - origin, "end_s": end - origin,
                        "elapsed_s": end - start, "io_wait_s": wait,
                        "rss_bytes": measure.rss_bytes(), "peak_rss_bytes": measure.peak_rss_bytes(),
                        "live_jax_bytes": live_jax_bytes(),
                        "planned_peak_bytes": plan[gi].peak_bytes})
        measure.reset_peak_rss()

    loads = hasattr(staged.prefetcher, "load_log")
    log: list = []
    if loads:
        staged.prefetcher.load_log = log
    measure.reset_peak_rss()
    staged.observer = observe
    origin = time.perf_counter()
    try:
        staged.step(token, position)
    finally:
        staged.observer = None
        if loads:
            staged.prefetcher.load_log = None
    streamed = [g for g in staged.groups if streams_weights(g)]
    first_unit = getattr(staged.prefetcher, "first_unit_of_read", lambda read: read)
    return {"groups": records,  # a load names the first group of the units it read together
            "loads": [{"group": streamed[first_unit(read)].id, "start_s": start - origin,
                       "end_s": end - origin, "bytes": nbytes} for read, start, end, nbytes in log]}


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

    phases.enter("convert")
    checkpoint = convert_checkpoint(handle, settings.paths.cache, settings.schedule.ffn_chunks,
                                    settings.schedule.vocab_chunk, settings.quant.scheme,
                                    progress=progress)
    release_freed_memory()
    store = WeightStore(checkpoint, verify=settings.store.verify, expect_config=config,
                        drop_page_cache=settings.store.drop_page_cache)
    capacity = max(len(ids) + max_new + 1, n_ctx if settings.eval.ppl_chunks else 0)
    phases.enter("compile")
    compiled_from = compile_cache.counters()
    run = ScheduleRun(settings, handle, store, capacity, len(ids), sampling, progress)
    keys = sampling_keys(settings.seed, max_new)  # compiles: before the baseline
    release_freed_memory()
    baseline_rss = measure.rss_bytes()
    compiled = compile_cache.counters().since(compiled_from)

    phases.enter("load")
    run.load()
    session = run.session()
    decode_io = {}

    def before_decode():
        decode_io["first_token_age_s"] = measure.process_age_s()
        decode_io["prefill_peak"] = peak.phase_peak_bytes()
        if run.staged is not None:
            run.staged.release_pass_buffers(keep_tokens=1)
        release_freed_memory()  # prefill's freed temporaries are not the decode's working set
        phases.enter("decode")
        peak.start_phase()
        decode_io["start"] = run.io_counters()
        if on_decode_start is not None:
            on_decode_start(baseline_rss)

    phases.enter("prefill")
    peak.start_phase()
    generation = run_generation(session, ids, max_new, settings.seed, config.eos_token_id,
                                handle.tokenizer.decode, run.compile_s, before_decode=before_decode,
                                keys=keys)
    peak_decode = peak.phase_peak_bytes()
    bytes_end, wait_end = run.io_counters()
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
    if run.staged is not None:
        planned = run.planned
        for name, pass_plan in planned.passes.items():
            metrics[f"planned_{name}_peak_bytes"] = pass_plan.peak_bytes
        metrics.update(predicted_step_s=planned.predicted_step_s,
                       predicted_pipeline_step_s=planned.pipeline_step_s,
                       measured_step_s=measured_step, device=run.planner_context.device.name)
        if run.checkpoint_read_bytes_per_s is not None:
            metrics["checkpoint_warm_read_bytes_per_s"] = run.checkpoint_read_bytes_per_s
    else:
        metrics.update(predicted_step_s=run.model_predicted_s,
                       predicted_pipeline_step_s=run.model_predicted_s,
                       measured_step_s=measured_step, device=run.device.name)

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
    if hasattr(run, "warmup_s"):
        metrics["warmup_s"] = run.warmup_s
    if run.staged is not None:
        run.staged.close()
    store.close()
    atomic_write_json(out_dir / "plan.json", plan_records(run, plan, timeline))
    atomic_write_json(out_dir / "timeline.json", timeline)
    atomic_write_json(out_dir / "resolved_settings.json", dataclasses.asdict(settings))
    atomic_write_json(out_dir / "metrics.json", metrics)
    phases.enter("done")
    return metrics


def plan_records(run: ScheduleRun, plan: list[GroupPlan], timeline: dict) -> list[dict]:
    """plan.json: per group the budget accounting, and for staged runs the roofline's FLOPs and
    predicted seconds beside the instrumented step's measured seconds (`measured_s`; that step
    samples RSS between groups, so its prefetch runs further ahead than in the timed steps) and
    the XLA temporaries its compiled decode executables need (`compiled_scratch_bytes`) beside
    the plan's bound of them (`scratch_bytes`)."""
    rows = [dataclasses.asdict(row) | {"peak_bytes": row.peak_bytes} for row in plan]
    if run.staged is None:
        return rows
    measured = {r["group"]: r["elapsed_s"] for r in timeline["groups"]}
    compiled_scratch = run.staged.temp_bytes()
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
