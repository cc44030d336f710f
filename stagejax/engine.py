"""A schedule ready to run: its plan, and the engine that runs the plan (design §5, §7).

Every policy is planned the same way (`planner.make_plan`) and accounted by the same
`scheduler.MemoryModel`; `model` is the plan of one group holding every stage, its weights
resident. The plan is run by an engine, and every engine speaks one protocol, so a caller (the
main job, the Python API, benchmarks) never asks which policy it holds:

  dry_run(score)            every executable once on zero weights (before the baseline)
  load()                    read what the plan keeps resident (nothing for streamed plans)
  prefill(ids) -> logits    the prompt; step(token, position) -> logits; sample(logits, key)
  token_nll(window)         NLL of window[1:] given their prefixes, [len(window) - 1]
  plan(tokens, scoring)     per group, the memory of a pass (`scheduler.GroupPlan`)
  groups, n_executables     the plan's groups; executables compiled
  observer                  called after each group of a pass with (index, group, start, end, wait)
  io_counters()             (bytes read from storage so far, seconds waited for them)
  temp_bytes()              per group, XLA's temporaries in its decode executables
  release_pass_buffers(keep_tokens), close()

`executor.StagedDecoder` runs streamed plans group by group; `ResidentDecoder` runs the
resident plan as the monolithic model's executables (`decode.MonolithicDecoder`): one group,
its weights read once by `load`.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from stagejax.decode import MonolithicSession, decoder_for, decoder_shape, token_nll
from stagejax.devices import device_from_settings
from stagejax.executor import StagedDecoder
from stagejax.kv_cache import (KVLayout, cache_capacity, read_bytes as kv_read_bytes,
                               resident_cache_bytes, stored_row_bytes)
from stagejax.loading import release_freed_memory
from stagejax.planner import PlanContext, make_plan
from stagejax.quant import largest_dequantized_bytes
from stagejax.sampling import SamplingConfig
from stagejax.scheduler import RESIDENT_POLICIES, Group, GroupPlan, MemoryModel
from stagejax.settings import RunSettings
from stagejax.stages import ChunkLayout, build_stages
from stagejax.store import WeightStore, assemble_params
from stagejax.store.convert import resolve_cache_dir
from stagejax.store.layout import params_spec
from stagejax_device.weight_store import ALIGN_BYTES


def _run_passes(settings: RunSettings, prefill_tokens: int, score_tokens: int | None):
    """(tokens, scoring) of the passes a run makes besides decode steps: its prompt's, and
    perplexity's when it scores text."""
    passes = {(prefill_tokens, False)} | ({(score_tokens, True)} if settings.eval.ppl_chunks else set())
    return tuple(sorted(passes - {(1, False)}))


def _context(settings: RunSettings, config, layout: ChunkLayout, store: WeightStore, device, *,
             kv_len: int, **kv) -> PlanContext:
    arrays = store.manifest.arrays
    return PlanContext(
        config=config, layout=layout, stored_bytes=store.nbytes,
        slab_bytes_of=lambda keys: sum(-(-arrays[k].nbytes // ALIGN_BYTES) * ALIGN_BYTES for k in keys),
        device=device, kv_len=kv_len,
        dequant_bytes_of=lambda keys: largest_dequantized_bytes(keys, arrays), **kv)


def plan_context(settings: RunSettings, config, layout: ChunkLayout, store: WeightStore,
                 kv_layout: KVLayout, capacity: int, device) -> PlanContext:
    """What the planner needs to know about a streamed run's store, cache and machine."""
    schedule = settings.schedule
    kv_block = schedule.kv_block
    rows = cache_capacity(max(capacity, schedule.prefill_block), kv_block)
    # The passes the run makes besides decode steps, over the same groups
    # (StagedDecoder.pass_kinds).
    return _context(
        settings, config, layout, store, device, kv_len=capacity,
        kv_block_bytes=lambda n_groups: kv_read_bytes(config, kv_layout, n_groups, kv_block),
        kv_layer_bytes=rows * stored_row_bytes(config, kv_layout, config.n_kv_heads),
        prefetch_depth=schedule.prefetch_depth, kv_block=kv_block, past_rows=rows,
        kv_bits=stored_row_bytes(config, kv_layout, 1) * 8 / (2 * config.head_dim),
        kv_on_disk=kv_layout.location == "disk",
        kv_ram_bytes=resident_cache_bytes(config, kv_layout, max(capacity, schedule.prefill_block)),
        activations_in_ram=schedule.activations == "ram",
        other_passes=_run_passes(settings, schedule.prefill_block, schedule.prefill_block))


def resident_plan_context(settings: RunSettings, config, layout: ChunkLayout, store: WeightStore,
                          capacity: int, prompt_len: int, device) -> PlanContext:
    """The resident plan's context: its KV is the monolithic decoder's float32 cache of
    `cache_len` rows in RAM (a lossy cache dtype is emulated, not stored), its prompt one pass
    of the decoder's prefill length, its scoring a cache-free forward over the window."""
    prefill_len, cache_len = decoder_shape(config, prompt_len, settings.decode.max_new_tokens + 1)
    layer_bytes = 2 * cache_len * config.n_kv_heads * config.head_dim * 4
    return _context(
        settings, config, layout, store, device, kv_len=capacity,
        kv_block_bytes=lambda n_groups: 0, kv_layer_bytes=layer_bytes, prefetch_depth=0,
        kv_block=cache_len, past_rows=cache_len, kv_bits=32, kv_on_disk=False,
        other_passes=_run_passes(settings, prefill_len, settings.eval.n_ctx))


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


class ResidentDecoder:
    """The resident plan (`model`): one group of every stage, its weights read once by `load`
    and held, run as the monolithic model's executables. The engine protocol of the module
    docstring."""

    def __init__(self, config, store: WeightStore, layout: ChunkLayout, group: Group,
                 memory: MemoryModel, prompt_len: int, max_new_tokens: int,
                 sampling: SamplingConfig = SamplingConfig(), kv_dtype: str = "float32",
                 score_tokens: int | None = None):
        self.config, self.store, self.layout, self.memory = config, store, layout, memory
        self.groups = [group]
        self.prefetcher = None
        self.observer = None
        # The stored arrays' shapes: quantized matrices stay quantized (stagejax.quant).
        self.params_spec = params_spec(store.manifest)
        start = time.perf_counter()
        self.decoder = decoder_for(config, self.params_spec, prompt_len, max_new_tokens, sampling, kv_dtype)
        self.score_tokens = score_tokens
        self._nll = jax.jit(lambda p, t: token_nll(config, p, t, kv_dtype)) if score_tokens else None
        self.compile_s = time.perf_counter() - start
        self.warmup_s = 0.0
        self.params = None
        self._session = None
        # prefill, step, the sampler, the KV writes (and the scorer)
        self.n_executables = 3 + len(self.decoder._write) + (self._nll is not None)

    def dry_run(self, score: bool = False) -> None:
        """Warm up every executable the run will call, on one shared zero buffer per weight
        shape, before the baseline (design §7: the same point for every schedule)."""
        zeros = shared_zeros(self.params_spec)
        self.warmup_s = self.decoder.warm_up(zeros)
        if score and self._nll is not None:
            jax.block_until_ready(self._nll(zeros, np.zeros((1, self.score_tokens), np.int32)))
        del zeros

    def load(self) -> None:
        """Read every weight once and keep it resident (the classic baseline)."""
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
        self._session = MonolithicSession(self.decoder, self.params)

    def _loaded(self) -> MonolithicSession:
        if self._session is None:
            raise RuntimeError("the resident plan's weights are not loaded: call load() first")
        return self._session

    def prefill(self, prompt_ids) -> jax.Array:
        return self._observed(lambda: self._loaded().prefill(prompt_ids))

    def step(self, token: int, position: int) -> jax.Array:
        return self._observed(lambda: self._loaded().step(token, position))

    def _observed(self, run):
        if self.observer is None:
            return run()
        start = time.perf_counter()
        logits = jax.block_until_ready(run())
        self.observer(0, self.groups[0], start, time.perf_counter(), 0.0)
        return logits

    def sample(self, logits, key) -> jax.Array:
        return self.decoder.sample(logits, key)

    def token_nll(self, window) -> np.ndarray:
        self._loaded()
        return np.asarray(self._nll(self.params, jnp.asarray(np.asarray(window, np.int32)[None])))[0]

    def plan(self, tokens: int = 1, scoring: bool = False) -> list[GroupPlan]:
        return self.memory.plan(self.groups, tokens, scoring)

    def io_counters(self) -> tuple[int, float]:
        return self.store.bytes_read, self.store.io_wait_s

    def temp_bytes(self, tokens: int = 1, scoring: bool = False) -> list[int]:
        """XLA's temporaries of the decode step's executable (the plan's one group)."""
        return [int(self.decoder._step.memory_analysis().temp_size_in_bytes)]

    def release_pass_buffers(self, keep_tokens: int = 1) -> None:
        """Nothing: the monolithic executables hold no buffers between passes."""

    def close(self) -> None:
        self._session = None


class ScheduleRun:
    """The run of one schedule: its plan (`planned`, made before anything compiles and
    validated against schedule.budget_mb) and the engine that runs it (`engine`), compiled and
    dry-run in the constructor; `compile_s` is that time."""

    def __init__(self, settings: RunSettings, handle, store: WeightStore, capacity: int,
                 prompt_len: int, sampling: SamplingConfig, progress: bool = False):
        self.settings, self.store = settings, store
        config = self.config = handle.config
        manifest = store.manifest
        self.layout = ChunkLayout(tuple(manifest.ffn_chunk_bounds), tuple(manifest.vocab_chunk_bounds))
        stages = build_stages(config, self.layout, manifest.arrays)
        self.n_stages = len(stages)
        self.policy = settings.schedule.policy
        schedule, cache = settings.schedule, settings.cache
        start = time.perf_counter()
        device = device_from_settings(settings.device, settings.paths.cache)
        self.checkpoint_read_bytes_per_s = None
        if settings.device.calibrated and not settings.store.drop_page_cache:
            # This machine: the streaming time is predicted from this checkpoint's own
            # page-cache read rate, measured now (~0.1 s; it also warms the cache).
            self.checkpoint_read_bytes_per_s = store.warm_read_rate()
            device = dataclasses.replace(device, storage_warm_bytes_per_s=self.checkpoint_read_bytes_per_s)
        budget = None if schedule.budget_mb is None else int(schedule.budget_mb * 2**20)
        if self.policy in RESIDENT_POLICIES:
            self.planner_context = resident_plan_context(settings, config, self.layout, store,
                                                         capacity, prompt_len, device)
            self.planned = make_plan(stages, self.policy, self.planner_context, budget)
            self.engine = ResidentDecoder(
                config, store, self.layout, self.planned.groups[0], self.planner_context.memory,
                prompt_len, settings.decode.max_new_tokens + 1, sampling, cache.dtype,
                settings.eval.n_ctx if settings.eval.ppl_chunks else None)
        else:
            cache_dir = resolve_cache_dir(settings.paths.cache)
            kv_layout = KVLayout(cache.kind, cache.order, cache.block_tokens or schedule.kv_block,
                                 cache.dtype, settings.paths.scratch or str(cache_dir / "scratch"))
            self.planner_context = plan_context(settings, config, self.layout, store, kv_layout,
                                                capacity, device)
            self.planned = make_plan(stages, self.policy, self.planner_context, budget)
            self.engine = StagedDecoder(
                config, store, self.layout, self.policy, kv_layout,
                capacity=capacity, prefill_block=schedule.prefill_block,
                prefetch_depth=schedule.prefetch_depth, sampling=sampling,
                groups=self.planned.groups, kv_block=schedule.kv_block,
                activations=schedule.activations, reader=settings.store.reader,
                scratch_dir=kv_layout.directory, native_dir=str(cache_dir / "native"),
                compile_workers=settings.compile_workers)
        if progress:
            print(self.planned.table(), flush=True)
        self.engine.dry_run(score=bool(settings.eval.ppl_chunks))
        self.compile_s = time.perf_counter() - start

    @property
    def n_groups(self) -> int:
        return len(self.engine.groups)

    @property
    def n_executables(self) -> int:
        return self.engine.n_executables

    def nll_fn(self):
        """[1, T] windows -> [1, T - 1] NLL, the perplexity procedures' signature."""
        return lambda window: self.engine.token_nll(np.asarray(window)[0])[None]

    def plan(self) -> list[GroupPlan]:
        return self.engine.plan()

    def close(self) -> None:
        self.engine.close()
