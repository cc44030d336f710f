"""Running a plan: groups of stages as AOT-compiled executables, weights streamed from the
WeightStore, the KV cache read in blocks, activations donated from group to group.

One executable per distinct group signature (stage kinds + shapes), so same-shaped groups in
different layers or heads share it; per-stage heads, groups and offsets are traced constants.
The hot path is: prefetcher.next() → executable call → block → release → (flush new KV rows);
no op-by-op JAX between stages. Everything a group held is released before the next one runs,
except the weights the prefetcher is reading ahead.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stagejax_device.weight_store import ZeroWeights
from stagejax.activation_store import ActivationStore
from stagejax.quant import largest_dequantized_bytes
from stagejax_device.coalesce import CoalescingPrefetcher
from stagejax.loading import return_free_heap
from stagejax.kv_cache import (HostKVCache, KVLayout, aligned_empty, resident_cache_bytes, stored_kv,
                               stored_kv_group)
from stagejax.model_config import ModelConfig
from stagejax.sampling import SamplingConfig, sample_token
from stagejax.scheduler import (Group, GroupPlan, MemoryModel, group_stages, kv_flush_points,
                                streams_weights, xla_scratch_bytes)
from stagejax.stage_kinds import KINDS, attention_block_step, kv_groups_of, StageCalls
from stagejax.stages import (ChunkLayout, Stage, build_stages, init_state, scored_nll,
                             stage_index_value)
from stagejax.models import ops


# Executables with attention are compiled without XLA's YNNPACK fusions: the value sum of a decode
# step (a multiply-reduce, ops.online_softmax_update) became a YNNPACK fusion taking 263 µs of
# a 284 µs call; XLA's own loop fusion takes ~2 µs (SmolLM2, one head over 512 rows).
ATTENTION_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Groups with at least this much of XLA temporaries in a scoring pass have the heap trimmed after them
# (`StagedDecoder._groups_to_trim_after`).
TRIM_AFTER_SCRATCH_BYTES = 4 * 2**20


class Host(jax.ShapeDtypeStruct):
    """An argument that real calls pass as a host numpy array (weights, KV blocks)."""


def _warm_up(function, *specs) -> None:
    """Compile `function` for these shapes by running it once on zeros.

    Executables are called through `jax.jit`'s C++ dispatch path (~8 µs a call here, against
    ~22 µs for an AOT `Compiled` object's Python `__call__`); running each once before anything
    is timed compiles it into that path's cache, so no timed call compiles. The cache key tells
    numpy from JAX arguments, so each zero is made the kind the real call passes: `Host` specs
    as numpy arrays, the rest as device arrays.
    """
    zeros = jax.tree_util.tree_map(
        lambda spec: (np.zeros(spec.shape, spec.dtype) if isinstance(spec, Host)
                      else jnp.zeros(spec.shape, spec.dtype)), specs)
    jax.block_until_ready(function(*zeros))


@dataclasses.dataclass(frozen=True)
class Program:
    """One distinct executable of a plan: the seam the JAX executor and the exporter share
    (design §9). A pure function, the argument specs it is compiled for (static shapes; `Host`
    marks arguments real calls pass as host arrays), the arguments it donates and XLA's options.
    The executor compiles `jit()`; `stagejax.export` serialises the same `jit()` with
    `jax.export` for IREE, so the two run one description."""

    name: str
    fn: Callable
    specs: tuple
    donate_argnums: tuple[int, ...] = ()
    compiler_options: dict | None = None

    def jit(self):
        # keep_unused: a stage that only writes an entry (embed: x, norms: h) must still receive
        # its donated buffer, so the output reuses it; and exported signatures stay whole.
        return jax.jit(self.fn, donate_argnums=self.donate_argnums, keep_unused=True,
                       compiler_options=self.compiler_options)


def sampler_program(config: ModelConfig, sampling: SamplingConfig) -> Program:
    """Next token from a step's logits [V] and a PRNG key [2] uint32."""
    return Program("sample", lambda logits, key: sample_token(logits, key, sampling),
                   (jax.ShapeDtypeStruct((config.vocab_size,), jnp.float32),
                    jax.ShapeDtypeStruct((2,), jnp.uint32)))


def _memo(cache: dict, key, make: Callable):
    """cache[key], made by make(key) the first time."""
    if key not in cache:
        cache[key] = make(key)
    return cache[key]


def _leaf(key: str) -> str:
    return key.rsplit("/", 1)[1]


@dataclasses.dataclass(frozen=True)
class _GroupFacts:
    kind: str
    weight_keys: tuple[str, ...]
    entries: tuple  # (written, read_only) in generation mode
    scoring_entries: tuple  # the same in scoring mode
    kv_layers: tuple[int, ...]
    flush_layers: tuple[int, ...]


class StagedDecoder:
    """Staged prefill, decode steps and scoring for one policy over a stage-shard checkpoint.

    Args:
      store: an open `stagejax.store.WeightStore`.
      policy: "atomic" | "op" | "layer" (the "model" baseline runs `MonolithicDecoder`).
      capacity: KV rows to allocate (prompt + generated tokens).
      prefill_block: tokens per prefill/scoring pass.
      kv_block: KV rows per attention call (schedule.kv_block; a multiple of the layout's
        block_tokens; default: one stored block).
      activations: "ram" (donated from group to group) or "disk" (each group's outputs written
        to a file and read back by the groups that use them; `ActivationStore`).
      scratch_dir: where a disk KV cache (unless `kv_layout.directory` says) and activations
        on disk keep their files; None: the system's temporary directory.
      native_dir: where the C weight reader is compiled (`native_stream.library`).
      warm_up: compile every executable now (False: only describe them as `programs`, as the
        exporter needs; such a decoder cannot run).
      compile_workers: executables compiled at once. XLA's CPU compiler releases the GIL, so
        backend compiles overlap (tracing and lowering do not: five knob-matrix cases took
        ~12% less time with 2 workers on 2 cores); each concurrent compile holds its own
        temporaries, so the start-up's high-water RSS can rise (1: one after another).
    """

    def __init__(self, config: ModelConfig, store, layout: ChunkLayout, policy: str,
                 kv_layout: KVLayout, capacity: int, prefill_block: int = 64,
                 prefetch_depth: int = 1, sampling: SamplingConfig = SamplingConfig(),
                 groups: Sequence[Group] | None = None, kv_block: int | None = None,
                 activations: str = "ram", reader: str = "auto", scratch_dir: str | None = None,
                 native_dir: str | None = None, warm_up: bool = True, compile_workers: int = 1):
        if compile_workers < 1:
            raise ValueError(f"compile_workers must be >= 1, got {compile_workers}")
        self.config, self.store, self.layout, self.policy = config, store, layout, policy
        # Stored keys: a quantized weight is several arrays (stagejax.quant), listed per stage.
        self.stages: list[Stage] = build_stages(config, layout, store.manifest.arrays)
        # Leaves of one embedding row as stored ("w", or e.g. "w_i4", "w_scale"): read per token.
        self._embed_leaves = tuple(_leaf(k) for k in self.stages[0].weight_keys
                                   if k.startswith("embed/0/"))
        if groups is not None:  # the caller's stages may list float keys: use the stored ones
            by_id = {s.id: s for s in self.stages}
            groups = [dataclasses.replace(g, stages=tuple(by_id[s.id] for s in g.stages))
                      for g in groups]
        self.groups: list[Group] = list(groups) if groups is not None else group_stages(
            self.stages, policy, config)
        if any(g.kind == "fused" and any(KINDS[s.kind].on_demand for s in g.stages) for g in self.groups):
            raise ValueError("the embed stage must be a group of its own")
        if kv_layout.directory is None and scratch_dir is not None:
            kv_layout = dataclasses.replace(kv_layout, directory=scratch_dir)
        self.kv_layout = kv_layout
        if activations not in ("ram", "disk"):
            raise ValueError(f"schedule.activations must be ram or disk, got {activations!r}")
        self.activation_store = ActivationStore(scratch_dir) if activations == "disk" else None
        self.kv_block = kv_block or kv_layout.block_tokens
        self.prefill_block = prefill_block
        self.rows_writable = max(capacity, prefill_block)  # the cache rounds up to whole reads
        self.cache = HostKVCache(config, self.rows_writable, kv_layout, self.kv_block)
        self.flush_points = kv_flush_points(self.groups, config)
        self.prefetch_depth = prefetch_depth
        self._units = [list(g.weight_keys) for g in self.groups if streams_weights(g)]
        # Consecutive small units are read together into one slab: fewer thread hand-offs.
        self.prefetcher = CoalescingPrefetcher(store, self._units, prefetch_depth, reader,
                                               native_dir=native_dir)
        # Device arrays made once per distinct value: an atomic plan's ~1,150 groups repeat a
        # few dozen, and each array made eagerly costs ~0.1 ms.
        index_arrays: dict[tuple[int, ...], jax.Array] = {}
        self._index = [_memo(index_arrays, tuple(stage_index_value(s, layout) for s in g.stages),
                             lambda values: jnp.asarray(values, jnp.int32))
                       for g in self.groups]
        # Per-group facts the hot loop needs, computed once (Group's properties recompute).
        self._facts = [_GroupFacts(g.kind, g.weight_keys, g.state_entries(False),
                                   g.state_entries(True), g.kv_layers, self.flush_points.get(i, ()))
                       for i, g in enumerate(self.groups)]
        self._ints: dict[int, jax.Array] = {}
        self._first_head = [self._int(g.stages[0].index) for g in self.groups]
        self._embed_rows: dict[int, np.ndarray] = {}
        self.kv_wait_s = 0.0
        # Instrumented passes: called after each group with (index, group, start, end, wait)
        # — perf_counter seconds, and the seconds it waited for weights or KV blocks.
        self.observer: Callable[[int, Group, float, float, float], None] | None = None
        self._warm_up = warm_up
        start = time.perf_counter()
        self._executables: dict[tuple, Callable] = {}
        self.programs: dict[tuple, Program] = {}  # by signature, beside `_executables`
        self._specs: dict[int, tuple] = {}  # argument specs, by id() of the kept executable
        self._group_exe: dict[tuple[int, int, bool], Callable] = {}
        self._state_specs: dict[tuple[int, bool], dict] = {}
        # fused groups trace each distinct stage signature once; one-stage groups call it directly
        self._fused_stage_calls = StageCalls(config)
        self._single_stage_calls = StageCalls(config, nested=False)
        self.sampling = sampling
        self.sampler = sampler_program(config, sampling)
        self._sample = self.sampler.jit()
        # Tracing and lowering hold the GIL; a pool overlaps XLA's backend compiles.
        self._compiles = (concurrent.futures.ThreadPoolExecutor(compile_workers, "compile")
                          if warm_up and compile_workers > 1 else None)
        self._compiling: list[concurrent.futures.Future] = []
        try:
            for tokens, scoring in self.pass_kinds():
                for gi in range(len(self.groups)):
                    self._group_exe[(gi, tokens, scoring)] = self._compile_group(gi, tokens, scoring)
            if warm_up:
                self._compile(self._sample, self.sampler.specs)
            for future in self._compiling:
                future.result()
        finally:
            if self._compiles is not None:
                self._compiles.shutdown(cancel_futures=True)
            self._compiles, self._compiling = None, []
        self.compile_s = time.perf_counter() - start
        self._states = {}
        self._trim_after: dict[tuple[int, bool], frozenset[int]] = {}

    # ---- compilation ---------------------------------------------------------------------

    def pass_kinds(self) -> list[tuple[int, bool]]:
        """(tokens, scoring) of every pass this decoder runs: decode steps (1 token, generation),
        prefill and scoring passes (`prefill_block` tokens). A one-token scoring pass never
        runs unless the prefill block is one token, so it is not compiled."""
        return sorted({(1, False), (self.prefill_block, False), (self.prefill_block, True)})

    def _attention_modes(self, tokens: int) -> tuple[str, ...]:
        """The attention executables a pass of `tokens` can call within the KV capacity: the
        past of a pass starting at row `start` is ceil(start / kv_block) blocks, and a pass
        starts at most `capacity - tokens` rows in (`_run_attention`)."""
        most_blocks = max(1, -(-(self.cache.capacity - tokens) // self.kv_block))
        return ("only",) + (("first", "last") if most_blocks >= 2 else ()) + (
            ("middle",) if most_blocks >= 3 else ())

    def _spec(self, key: str) -> Host:
        info = self.store.manifest.arrays[key]
        return Host(tuple(info.shape), np.dtype(info.dtype))

    def _state_spec(self, tokens: int, scoring: bool) -> dict:
        """Shapes of a pass's activation state (traced once per pass kind: a plan has hundreds
        of groups, and tracing is never cached across runs)."""
        key = (tokens, scoring)
        if key not in self._state_specs:
            self._state_specs[key] = jax.eval_shape(lambda: init_state(self.config, tokens, scoring))
        return self._state_specs[key]

    def _ctx_spec(self, tokens: int, scoring: bool) -> dict:
        i32 = lambda shape=(): jax.ShapeDtypeStruct(shape, jnp.int32)
        ctx = {"positions": i32((1, tokens)), "past_len": i32(), "last": i32()}
        if scoring:
            ctx["targets"] = i32((tokens,))
        return ctx

    def _compile_group(self, gi: int, tokens: int, scoring: bool):
        group = self.groups[gi]
        written, read_only = group.state_entries(scoring)
        state_spec = self._state_spec(tokens, scoring)
        if group.kind == "embed":
            arrays = self.store.manifest.arrays
            weight_specs = tuple(Host((tokens,) + tuple(arrays[f"embed/0/{leaf}"].shape[1:]),
                                      np.dtype(arrays[f"embed/0/{leaf}"].dtype))
                                 for leaf in self._embed_leaves)
            names = self._embed_leaves
            if self.config.traits.learned_positions:
                weight_specs += (Host((tokens, self.config.d_model), jnp.float32),)
                names += ("pos_rows",)
            signature = ("embed", tokens, scoring, names,
                         tuple((w.shape, str(w.dtype)) for w in weight_specs))
            leaves = (names,)
            kinds = (group.stages[0].kind,)
        elif group.kind == "attn_blocks":
            n_heads = len(group.stages)
            n_groups = kv_groups_of(self.config, n_heads)
            block_spec = self._host_specs(n_groups, self.kv_block)
            return {mode: self._compile_attn(tokens, scoring, n_heads, n_groups, block_spec, mode)
                    for mode in self._attention_modes(tokens)}
        else:
            weight_specs = tuple(self._spec(k) for k in group.weight_keys)
            leaves = tuple(tuple(_leaf(k) for k in s.weight_keys) for s in group.stages)
            kinds = tuple(s.kind for s in group.stages)
            signature = ("fused", tokens, scoring, kinds, leaves,
                         tuple((w.shape, str(w.dtype)) for w in weight_specs), len(group.kv_layers))
        if signature in self._executables:
            return self._executables[signature]
        config, order, kv_dtype = self.config, self.kv_layout.order, self.kv_layout.dtype
        stage_calls = (self._single_stage_calls if len(group.stages) == 1
                       else self._fused_stage_calls)
        kv_slots = {layer: slot for slot, layer in enumerate(group.kv_layers)}
        stage_slots = [kv_slots.get(s.layer) for s in group.stages]

        # A run of a layer's every head of a `reads_kv` kind (its stages of a layer are
        # consecutive) is computed as one batched call over the layer's past (`layer_fn`).
        n_heads = config.n_heads
        whole_layer = {j for j in range(len(kinds) - n_heads + 1)
                       if KINDS[kinds[j]].layer_fn is not None
                       and kinds[j:j + n_heads] == (kinds[j],) * n_heads
                       and (j == 0 or kinds[j - 1] != kinds[j])}

        def run(mut, const, weights, ctx, index, past):
            state = {**const, **mut}
            position = 0
            skip = 0
            for j, (kind, names) in enumerate(zip(kinds, leaves)):
                if skip:  # heads already computed with the layer's batched attention
                    skip -= 1
                    continue
                if j in whole_layer:
                    past_k, past_v = stored_kv(past[stage_slots[j]], order, kv_dtype, 0,
                                               config.n_kv_heads)
                    state = stage_calls(kind, state, {"past_k": past_k, "past_v": past_v,
                                                      "kv_dtype": kv_dtype}, ctx, index[j],
                                        whole_layer=True)
                    skip = n_heads - 1
                    continue
                if KINDS[kind].reads_kv:
                    past_k, past_v = stored_kv_group(past[stage_slots[j]], order, kv_dtype,
                                                     index[j] // config.queries_per_kv_head)
                    w = {"past_k": past_k, "past_v": past_v, "kv_dtype": kv_dtype}
                else:
                    w = dict(zip(names, weights[position:position + len(names)]))
                    position += len(names)
                state = stage_calls(kind, state, w, ctx, index[j])
            return {e: state[e] for e in written}

        past_spec = tuple(self._host_specs(None, self.cache.capacity) for _ in group.kv_layers)
        options = ATTENTION_COMPILER_OPTIONS if any(KINDS[k].reads_kv for k in kinds) else None
        return self._keep(signature, run, (
            {e: state_spec[e] for e in written}, {e: state_spec[e] for e in read_only},
            weight_specs, self._ctx_spec(tokens, scoring),
            jax.ShapeDtypeStruct((len(group.stages),), jnp.int32), past_spec), (0,), options)

    def _keep(self, signature: tuple, fn, specs: tuple, donate_argnums: tuple = (),
              compiler_options: dict | None = None):
        """Make `fn` a `Program`, compile it for `specs` (`_warm_up`) and keep it under
        `signature`; returns the jitted executable."""
        kind, tokens, scoring = signature[:3]
        name = f"{kind}_t{tokens}_{'score' if scoring else 'gen'}_{len(self.programs)}"
        program = Program(name, fn, specs, donate_argnums, compiler_options)
        executable = program.jit()
        if self._warm_up:
            self._compile(executable, specs)
        self.programs[signature] = program
        self._executables[signature] = executable
        self._specs[id(executable)] = specs
        return executable

    def _compile(self, executable, specs: tuple) -> None:
        """`_warm_up` now, or in the compile pool (waited for at the end of `__init__`)."""
        if self._compiles is None:
            _warm_up(executable, *specs)
        else:
            self._compiling.append(self._compiles.submit(_warm_up, executable, *specs))

    def _host_specs(self, n_groups: int | None, rows: int) -> tuple[Host, ...]:
        """Specs of a KV read in storage form (see `HostKVCache.specs`)."""
        return tuple(Host(s.shape, s.dtype) for s in self.cache.specs(n_groups, rows))

    def _compile_attn(self, tokens, scoring, n_heads, n_groups, block_spec, mode):
        """One attention call over one KV block. `mode`: "first" | "middle" | "last" block of
        several, or the "only" one. The online-softmax carry is an argument only where it has
        something in it: a first block starts it inside the executable and an only block needs
        none, so most decode calls (the past fits one block) pass and return no carry."""
        signature = ("attn", tokens, scoring, n_heads, tuple(s.shape for s in block_spec), mode)
        if signature in self._executables:
            return self._executables[signature]
        config, order, kv_dtype = self.config, self.kv_layout.order, self.kv_layout.dtype
        state_spec = self._state_spec(tokens, scoring)
        finish = mode in ("last", "only")

        def fold(attn, carry, const, block, ctx, first_head, block_start):
            state = {**const, "attn": attn}
            first_group = first_head // config.queries_per_kv_head
            k, v = stored_kv(block, order, kv_dtype, first_group, n_groups)
            state, carry = attention_block_step(config, state, carry, ctx, first_head, n_heads,
                                                k, v, block_start, finish, kv_dtype)
            return state["attn"], carry

        fresh = lambda: ops.online_softmax_init(tokens, n_heads, config.head_dim)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        carry_spec = jax.eval_shape(fresh)
        const_spec = {e: state_spec[e] for e in ("q", "k_new", "v_new")}
        ctx_spec = self._ctx_spec(tokens, scoring)
        if mode == "only":
            def run(attn, const, block, ctx, first_head):
                return fold(attn, fresh(), const, block, ctx, first_head, 0)[0]
            specs, donate = (state_spec["attn"], const_spec, block_spec, ctx_spec, scalar), (0,)
        elif mode == "first":
            def run(const, block, ctx, first_head):
                return fold(None, fresh(), const, block, ctx, first_head, 0)[1]
            specs, donate = (const_spec, block_spec, ctx_spec, scalar), ()
        else:
            run = fold
            specs = (state_spec["attn"], carry_spec, const_spec, block_spec, ctx_spec, scalar, scalar)
            donate = (0, 1) if finish else (1,)
        return self._keep(signature, run, specs, donate, ATTENTION_COMPILER_OPTIONS)

    def dry_run(self, score: bool = False) -> None:
        """One prefill pass (and one scoring pass if the run will `score` text) and one decode
        step on zero weights, through the real code path.

        Compiling (even with a warm-up call) leaves first-use costs behind: the dispatch
        path's caches, host-buffer adoption, KV reads and writes (~4 MB on the tiny model), a
        scoring pass's small helper programs. They are the runtime's, not the working set's,
        so runs do them before measuring the baseline. The passes' activation states are
        dropped afterwards (they are the passes' working set, rebuilt on use); the cache rows
        written here are later overwritten or masked.
        """
        zeros = ZeroWeights(self.store.manifest, self._units)
        store, prefetcher = self.store, self.prefetcher
        self.store, self.prefetcher = zeros, zeros
        block = [0] * self.prefill_block
        try:
            self.run_pass(block, 0, 1)
            if score:
                np.asarray(scored_nll(self.run_pass(block, 0, 1, block)))
            self.step(0, 1)
            self.release_pass_buffers(keep_tokens=1)
        finally:
            self.store, self.prefetcher = store, prefetcher
            self.cache.bytes_read = self.cache.bytes_written = 0
            self.kv_wait_s = 0.0
            if self.activation_store is not None:
                self.activation_store.bytes_read = self.activation_store.bytes_written = 0

    def temp_bytes(self, tokens: int = 1, scoring: bool = False) -> list[int]:
        """Per group, the largest scratch memory XLA allocates inside any of its executables
        (`memory_analysis().temp_size_in_bytes`): intermediates such as a transposed past or a
        materialised product live there, outside the arguments and outputs the plan counts.
        Reads the compiled executables (cached: no recompilation)."""
        def temp(executable) -> int:
            compiled = executable.lower(*self._specs[id(executable)]).compile()
            return int(compiled.memory_analysis().temp_size_in_bytes)
        result = []
        for gi in range(len(self.groups)):
            exe = self._group_exe[(gi, tokens, scoring)]
            result.append(max(temp(e) for e in (exe.values() if isinstance(exe, dict) else [exe])))
        return result

    @property
    def n_executables(self) -> int:
        return len(self._executables) + 1  # + the sampler

    # ---- planning --------------------------------------------------------------------------

    def plan(self, tokens: int = 1, scoring: bool = False) -> list[GroupPlan]:
        """Per group, the memory of a pass of `tokens` tokens (a perplexity pass if `scoring`)."""
        return self.memory.plan(self.groups, tokens, scoring, getattr(self.prefetcher, "slab_bytes", 0))

    @property
    def memory(self) -> MemoryModel:
        """This decoder's memory accounting (`scheduler.MemoryModel`)."""
        return MemoryModel(
            self.config, self.store.nbytes,
            lambda n_groups: self.cache.block_bytes(n_groups, self.kv_block), self.cache.layer_bytes(),
            self.prefetch_depth, lambda keys: largest_dequantized_bytes(keys, self.store.manifest.arrays),
            kv_buffer_persists=self.kv_layout.location == "disk",
            resident_kv_bytes=resident_cache_bytes(self.config, self.kv_layout, self.rows_writable),
            scratch_bytes_of=lambda group, tokens, scoring: xla_scratch_bytes(
                group, self.config, tokens, self.kv_block, self.cache.capacity, scoring, self.layout),
            activations_in_ram=self.activation_store is None)

    # ---- running ---------------------------------------------------------------------------

    def _int(self, value: int) -> jax.Array:
        """A cached int32 scalar: only for the few values passes repeat (the last real token
        of a pass, KV block offsets), not for positions."""
        return _memo(self._ints, value, jnp.int32)

    def _state(self, tokens: int, scoring: bool) -> dict:
        key = (tokens, scoring)
        if key not in self._states:
            self._states[key] = init_state(self.config, tokens, scoring)
        return self._states[key]

    def _embed_buffer(self, tokens: int) -> tuple[np.ndarray, ...]:
        """One buffer per stored embedding leaf ([tokens, ...] of its dtype), + GPT-2 positions."""
        if tokens not in self._embed_rows:
            arrays = self.store.manifest.arrays
            buffers = tuple(aligned_empty((tokens,) + tuple(arrays[f"embed/0/{leaf}"].shape[1:]),
                                          arrays[f"embed/0/{leaf}"].dtype)
                            for leaf in self._embed_leaves)
            if self.config.traits.learned_positions:
                buffers += (aligned_empty((tokens, self.config.d_model)),)
            self._embed_rows[tokens] = buffers
        return self._embed_rows[tokens]

    def _read_embed(self, token_ids: np.ndarray, start: int) -> tuple[np.ndarray, ...]:
        buffers = self._embed_buffer(len(token_ids))
        bounds = self.layout.vocab_bounds
        for t, token in enumerate(token_ids):
            c = self.layout.vocab_chunk_of(int(token))
            for leaf, buffer in zip(self._embed_leaves, buffers):
                row = self.store.read_rows(f"embed/{c}/{leaf}", [int(token) - bounds[c]])
                buffer[t] = row[0]
                self._release_rows(row)
        if self.config.traits.learned_positions:
            positions = np.minimum(np.arange(start, start + len(token_ids)), self.config.max_seq_len - 1)
            pos_rows = self.store.read_rows("pos_embed/w", positions.tolist())
            buffers[-1][:] = pos_rows
            self._release_rows(pos_rows)
        return buffers

    def _release_rows(self, rows: np.ndarray) -> None:
        release = getattr(self.store, "release", None)
        if release is not None:  # the dry run's zero weights are not lent
            release(rows)

    def run_pass(self, token_ids: Sequence[int], start: int, n_real: int,
                 targets: Sequence[int] | None = None):
        """Run every group once for tokens at positions [start, start + T), T = len(token_ids).

        Generation mode (targets None) leaves the last real token's logits in the state;
        scoring mode leaves each token's NLL of its target. Returns the final state.
        """
        tokens = len(token_ids)
        scoring = targets is not None
        if start + tokens > self.cache.capacity:
            raise ValueError(f"positions up to {start + tokens} exceed the KV capacity "
                             f"{self.cache.capacity}")
        token_ids = np.asarray(token_ids, np.int32)
        positions = np.arange(start, start + tokens, dtype=np.int32)[None]
        # past_len is a new array per pass: cached per position, one array per decoded token
        # would stay alive for the decoder's life.
        ctx = {"positions": jnp.asarray(positions), "past_len": jnp.int32(start),
               "last": self._int(n_real - 1)}
        if scoring:
            ctx["targets"] = jnp.asarray(np.asarray(targets, np.int32))
        spill = self.activation_store
        state = init_state(self.config, tokens, scoring) if spill else self._state(tokens, scoring)
        if scoring:  # fresh log-sum-exp accumulators for this pass
            state.update(nll_m=jnp.full((tokens,), ops.MASK_VALUE), nll_s=jnp.zeros((tokens,)),
                         nll_target=jnp.zeros((tokens,)))
        if spill:  # every entry starts in external memory
            for entry, value in state.items():
                spill.write((tokens, scoring, entry), value)
            state = {}
        observer = self.observer
        trim_after = self._groups_to_trim_after(tokens, scoring)
        for gi, facts in enumerate(self._facts):
            if observer:
                t0, wait0 = time.perf_counter(), self.store.io_wait_s + self.kv_wait_s
            exe = self._group_exe[(gi, tokens, scoring)]
            written, read_only = facts.scoring_entries if scoring else facts.entries
            if spill:
                needed = written + read_only + (("k_new", "v_new") if facts.flush_layers else ())
                for entry in needed:  # a copy: the read buffer is reused, the copy donated
                    state[entry] = jnp.array(spill.read((tokens, scoring, entry)))
            if facts.kind == "embed":
                rows = self._read_embed(token_ids, start)
                out = exe({e: state[e] for e in written}, {}, rows, ctx, self._index[gi], ())
                out[written[0]].block_until_ready()  # all outputs of one executable finish together
                state.update(out)
            elif facts.kind == "attn_blocks":
                self._run_attention(gi, self.groups[gi], exe, state, ctx, start, tokens)
            else:
                weights = self.prefetcher.next() if facts.weight_keys else None
                past = ()
                if facts.kv_layers:
                    kv_start = time.perf_counter()
                    past = tuple(self.cache.read_past(layer, start) for layer in facts.kv_layers)
                    self.kv_wait_s += time.perf_counter() - kv_start
                out = exe({e: state[e] for e in written}, {e: state[e] for e in read_only},
                          tuple(weights[k] for k in facts.weight_keys) if weights else (), ctx,
                          self._index[gi], past)
                out[written[0]].block_until_ready()  # before the weights' buffers go back to the pool
                state.update(out)
                del out, past
                if weights is not None:
                    self.prefetcher.release(weights)
                del weights
            for layer in facts.flush_layers:
                self.cache.write(layer, start, np.asarray(state["k_new"])[0],
                                 np.asarray(state["v_new"])[0])
            if spill:  # out to external memory; nothing stays resident between groups
                for entry in written:
                    spill.write((tokens, scoring, entry), state[entry])
                state.clear()
            if gi in trim_after:
                # XLA temporaries of several MB are freed onto the heap (glibc's sliding mmap
                # threshold), and the next group's, a little larger or allocated while these
                # are still being freed (`scheduler.lingering_scratch`), does not fit the
                # hole: a 2,048-token scoring window grew the heap 4 MB a layer past its plan.
                return_free_heap()
            if observer:
                observer(gi, self.groups[gi], t0, time.perf_counter(),
                         self.store.io_wait_s + self.kv_wait_s - wait0)
        if spill:  # what callers read: logits, or the scoring accumulators
            for entry in (("nll_m", "nll_s", "nll_target") if scoring else ("logits",)):
                state[entry] = jnp.array(spill.read((tokens, scoring, entry)))
        return state

    def _run_attention(self, gi, group, exes, state, ctx, start, tokens):
        n_heads = len(group.stages)
        n_groups = kv_groups_of(self.config, n_heads)
        first_head = group.stages[0].index
        first_group = first_head // self.config.queries_per_kv_head
        if self.kv_layout.order == "token_major":
            first_group, n_groups = 0, self.config.n_kv_heads  # blocks carry every group
        const = {e: state[e] for e in ("q", "k_new", "v_new")}
        n_blocks = max(1, -(-start // self.kv_block))
        layer = group.stages[0].layer
        head = self._first_head[gi]
        cache, kv_block = self.cache, self.kv_block
        kv_start = time.perf_counter()
        block = cache.read_block(layer, first_group, n_groups, 0, kv_block)
        self.kv_wait_s += time.perf_counter() - kv_start
        if n_blocks == 1:
            state["attn"] = exes["only"](state["attn"], const, block, ctx, head)
            state["attn"].block_until_ready()  # the block buffer is reused by the next read
            return
        carry = exes["first"](const, block, ctx, head)
        carry[0].block_until_ready()
        attn = state["attn"]
        for b in range(1, n_blocks):
            kv_start = time.perf_counter()
            block = cache.read_block(layer, first_group, n_groups, b * kv_block, kv_block)
            self.kv_wait_s += time.perf_counter() - kv_start
            last = b == n_blocks - 1
            attn, carry = exes["last" if last else "middle"](attn, carry, const, block, ctx, head,
                                                             self._int(b * kv_block))
            carry[0].block_until_ready()
        state["attn"] = attn

    def _groups_to_trim_after(self, tokens: int, scoring: bool) -> frozenset[int]:
        """Groups of a scoring pass whose XLA temporaries are large enough to hand back to the
        OS after they run. Only scoring passes: a perplexity run makes hundreds of them back to
        back, and without trims the heap grew past their plan; a trim costs more than itself —
        the next group's temporaries fault their pages in afresh — so in prompt passes, where
        one pass's growth is returned after it (`prefill`), trims after SmolLM2 `op`'s attention
        groups made prefill 1.4x slower (480 tokens: 5.4 s against 3.8 s without them)."""
        key = (tokens, scoring)
        if key not in self._trim_after:
            self._trim_after[key] = frozenset(
                gi for gi, group in enumerate(self.groups)
                if scoring and xla_scratch_bytes(group, self.config, tokens, self.kv_block,
                                                 self.cache.capacity, scoring, self.layout)
                >= TRIM_AFTER_SCRATCH_BYTES)
        return self._trim_after[key]

    # ---- the engine protocol (stagejax.engine) -----------------------------------------------

    def load(self) -> None:
        """Nothing: a streamed plan reads its weights group by group as it runs."""

    def io_counters(self) -> tuple[int, float]:
        """(bytes read from storage so far: weights + KV blocks + activations read back with
        schedule.activations=disk, seconds spent waiting for weights and KV)."""
        spilled = self.activation_store
        return (self.store.bytes_read + self.cache.bytes_read
                + (spilled.bytes_read if spilled is not None else 0),
                self.store.io_wait_s + self.kv_wait_s)


    def prefill(self, prompt_ids: Sequence[int]) -> jax.Array:
        """Run the prompt in passes of `prefill_block` tokens; returns the last token's logits."""
        prompt_ids = list(prompt_ids)
        if not prompt_ids:
            raise ValueError("the prompt is empty: give decode.prompt some text")
        state = None
        for start in range(0, len(prompt_ids), self.prefill_block):
            chunk = prompt_ids[start:start + self.prefill_block]
            padded = chunk + [0] * (self.prefill_block - len(chunk))
            state = self.run_pass(padded, start, len(chunk))
            return_free_heap()  # the pass's freed temporaries: not the next pass's working set
        return state["logits"]

    def step(self, token: int, position: int) -> jax.Array:
        return self.run_pass([token], position, 1)["logits"]

    def sample(self, logits, key) -> jax.Array:
        return self._sample(logits, key)

    def token_nll(self, window: Sequence[int]) -> np.ndarray:
        """NLL of window[1:] given their prefixes, through the staged path: [len(window) - 1]."""
        window = list(window)
        nll = []
        for start in range(0, len(window) - 1, self.prefill_block):
            chunk = window[start:start + self.prefill_block]
            targets = window[start + 1:start + 1 + self.prefill_block]
            n_real = len(targets)
            padded = chunk + [0] * (self.prefill_block - len(chunk))
            targets = targets + [0] * (self.prefill_block - n_real)
            state = self.run_pass(padded, start, len(chunk), targets)
            nll.append(np.asarray(scored_nll(state))[:n_real].copy())
            return_free_heap()  # as prefill
        return np.concatenate(nll)

    def release_pass_buffers(self, keep_tokens: int = 1) -> None:
        """Drop activation states and row buffers of passes other than `keep_tokens`
        tokens (e.g. the prefill's before decoding): idle memory otherwise. Rebuilt on use."""
        for key in [k for k in self._states if k[0] != keep_tokens]:
            del self._states[key]
        for key in [k for k in self._embed_rows if k != keep_tokens]:
            del self._embed_rows[key]

    def close(self) -> None:
        self.prefetcher.close()
        self.cache.close()
        if self.activation_store is not None:
            self.activation_store.close()
