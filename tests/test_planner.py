"""Plans under a RAM budget: the exact DP against brute force, `optimal` never predicted slower
than the heuristics, budgets respected, infeasible budgets explained, and staged == monolithic
for every budget policy."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stagejax.decode import forward_logits
from stagejax.executor import StagedDecoder
from stagejax.kv_cache import KVLayout, read_bytes, resident_cache_bytes, stored_row_bytes
from stagejax.loading import open_model
from stagejax.model_config import ModelConfig
from stagejax.planner import (BUDGET_POLICIES, InfeasibleBudget, PlanContext, account, make_plan,
                              optimal_partition, segments, valid_group)
from stagejax.roofline import Device
from stagejax.scheduler import Group, group_stages, kv_read_bytes
from stagejax.stages import ChunkLayout, build_stages
from stagejax.store import WeightStore, assemble_params, convert_checkpoint

# A fixed, made-up device: the tests check the algorithms, not this machine's numbers.
DEVICE = Device(name="test", flops_per_s={"float32": 5e10}, mem_read_bytes_per_s=2e10,
                storage_read_bytes_per_s=1e9, storage_warm_bytes_per_s=1e10,
                call_overhead_s=2e-5, ram_bytes=2**33, source="test constants")
KB = 1024


def context(config: ModelConfig, layout: ChunkLayout, depth=2, kv_len=40, kv_block=8,
            stored_bytes=None) -> PlanContext:
    kv = KVLayout("disk", "head_major", kv_block)
    sizes = {}
    for stage in build_stages(config, layout):
        for key in stage.weight_keys:
            sizes[key] = 4 * weight_elements(config, layout, key)
    stored = stored_bytes or (lambda keys: sum(sizes[k] for k in keys))
    return PlanContext(config=config, layout=layout, stored_bytes=stored,
                       slab_bytes_of=lambda keys: sum(-(-sizes[k] // 64) * 64 for k in keys),
                       kv_block_bytes=lambda n: read_bytes(config, kv, n, kv_block),
                       kv_layer_bytes=48 * stored_row_bytes(config, kv, config.n_kv_heads),
                       prefetch_depth=depth, device=DEVICE, kv_len=kv_len, kv_block=kv_block,
                       past_rows=48)


def weight_elements(config, layout, key):
    """Element count of a stage-shard key (llama family, as design §4 lays them out)."""
    d, h = config.d_model, config.head_dim
    parts = key.split("/")
    if parts[0] in ("embed", "head"):
        c = int(parts[1])
        return (layout.vocab_bounds[c + 1] - layout.vocab_bounds[c]) * d
    if parts[0] == "final_norm" or parts[1] in ("attn_norm", "ffn_norm"):
        return d
    if parts[1] in ("q", "k", "v"):
        return d * h
    if parts[1] == "o":
        return config.n_heads * h * d
    c = int(parts[2])
    return d * (layout.ffn_bounds[c + 1] - layout.ffn_bounds[c])


SMALL = ModelConfig(family="llama", vocab_size=101, d_model=48, n_layers=2, n_heads=4,
                    n_kv_heads=2, head_dim=12, ffn_dim=96, max_seq_len=64, norm_eps=1e-5,
                    rope_theta=10000.0, tie_embeddings=False, bos_token_id=1, eos_token_id=2)


TWO_HEADS = ModelConfig(family="llama", vocab_size=101, d_model=48, n_layers=2, n_heads=2,
                        n_kv_heads=1, head_dim=24, ffn_dim=96, max_seq_len=64, norm_eps=1e-5,
                        rope_theta=10000.0, tie_embeddings=False, bos_token_id=1, eos_token_id=2)


def test_dp_equals_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 11))
        costs = {(i, j): float(rng.uniform(0.1, 3.0)) + 0.5 for i in range(n) for j in range(i + 1, n + 1)}
        allowed = {k: (k[1] - k[0] == 1) or rng.random() < 0.6 for k in costs}
        value, runs = optimal_partition(n, lambda i, j: costs[i, j], lambda i, j: allowed[i, j])
        best = math.inf
        for cuts in itertools.product((0, 1), repeat=n - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            parts = list(zip(bounds, bounds[1:]))
            if all(allowed[p] for p in parts):
                best = min(best, sum(costs[p] for p in parts))
        assert value == pytest.approx(best)
        assert sum(costs[r] for r in runs) == pytest.approx(value)
        assert runs[0][0] == 0 and runs[-1][1] == n


def test_optimal_plan_is_optimal_on_a_small_model_by_brute_force():
    """Every contiguous grouping of each segment that fits (with the plan's slab cap) —
    none is predicted faster than the one `optimal` picked."""
    layout = ChunkLayout.create(TWO_HEADS, ffn_chunks=2, vocab_chunk=40)
    ctx = context(TWO_HEADS, layout)
    stages = build_stages(TWO_HEADS, layout)
    budget = 120 * KB
    plan = make_plan(stages, "optimal", ctx, budget)
    assert plan.peak_bytes <= budget
    for seg in segments(stages):
        chosen = [g for g in plan.groups if g.stages[0] in seg]
        chosen_time = sum(ctx.time(g)[0] for g in chosen)
        n = len(seg)
        assert n <= 14  # brute force stays small
        for cuts in itertools.product((0, 1), repeat=n - 1):
            bounds = [0] + [i + 1 for i, c in enumerate(cuts) if c] + [n]
            groups = [Group(tuple(seg[i:j])) for i, j in zip(bounds, bounds[1:])]
            if not all(valid_group(g.stages, TWO_HEADS) for g in groups):
                continue
            if max(ctx.peak(g, plan.slab_bytes) for g in groups) > budget or \
                    max(ctx.unit_bytes(g) for g in groups) > plan.slab_bytes:
                continue
            assert sum(ctx.time(g)[0] for g in groups) >= chosen_time - 1e-12


@pytest.mark.parametrize("budget_kb", [52, 64, 96, 160, 512, 2048])
def test_optimal_never_predicted_slower_and_budgets_hold(budget_kb):
    layout = ChunkLayout.create(SMALL, ffn_chunks=4, vocab_chunk=20)
    ctx = context(SMALL, layout)
    stages = build_stages(SMALL, layout)
    plans = {p: make_plan(stages, p, ctx, budget_kb * KB) for p in BUDGET_POLICIES}
    for plan in plans.values():
        assert plan.peak_bytes <= budget_kb * KB
        assert [s for g in plan.groups for s in g.stages] == stages  # every stage once, in order
    optimal = plans["optimal"].predicted_step_s
    assert optimal <= plans["budget"].predicted_step_s + 1e-12
    assert optimal <= plans["similar_size"].predicted_step_s + 1e-12
    assert optimal <= account("atomic", [Group((s,)) for s in stages], ctx).predicted_step_s + 1e-12


@pytest.mark.parametrize("budget_kb", [64, 160, 2048])
def test_every_group_is_charged_the_disk_caches_largest_read(budget_kb):
    """A disk cache keeps its read buffer between groups (as large as the plan's largest KV
    read), so every group's peak includes it, also groups that read no KV."""
    layout = ChunkLayout.create(SMALL, ffn_chunks=4, vocab_chunk=20)
    ctx = context(SMALL, layout)
    stages = build_stages(SMALL, layout)
    for policy in BUDGET_POLICIES:
        plan = make_plan(stages, policy, ctx, budget_kb * KB)
        largest = max(kv_read_bytes(g, SMALL, ctx.kv_block_bytes, ctx.kv_layer_bytes)
                      for g in plan.groups)
        assert largest > 0
        assert all(row.kv_bytes == largest for row in plan.rows)
        assert plan.peak_bytes <= budget_kb * KB


def test_a_cache_in_ram_is_charged_to_every_group():
    """A RAM cache holds every layer's rows through every group: each group's KV is its own
    read plus the whole resident cache, for fixed and budget policies, and a budget that
    cannot hold it says so."""
    layout = ChunkLayout.create(SMALL, ffn_chunks=4, vocab_chunk=20)
    ram = KVLayout("ram", "head_major", 8)
    resident = resident_cache_bytes(SMALL, ram, 40)
    assert resident == SMALL.n_layers * 40 * stored_row_bytes(SMALL, ram, SMALL.n_kv_heads) > 0
    assert resident_cache_bytes(SMALL, KVLayout("disk", "head_major", 8), 40) == 0
    base = dataclasses.replace(context(SMALL, layout), kv_on_disk=False)
    in_ram = dataclasses.replace(base, kv_ram_bytes=resident)
    stages = build_stages(SMALL, layout)
    for policy in ("atomic", "op", "layer"):
        without, charged = make_plan(stages, policy, base), make_plan(stages, policy, in_ram)
        assert [r.kv_bytes - w.kv_bytes for r, w in zip(charged.rows, without.rows)] == (
            [resident] * len(charged.rows))
        assert charged.peak_bytes == without.peak_bytes + resident
    for policy in BUDGET_POLICIES:
        plan = make_plan(stages, policy, in_ram, 160 * KB + resident)
        assert all(row.kv_bytes >= resident for row in plan.rows)
        assert plan.peak_bytes <= 160 * KB + resident
    atomic_peak = make_plan(stages, "atomic", base).peak_bytes
    with pytest.raises(InfeasibleBudget, match="KV cache held in RAM.*cache=disk"):
        make_plan(stages, "budget", in_ram, atomic_peak + resident // 2)


def test_bigger_budgets_give_fewer_groups():
    layout = ChunkLayout.create(SMALL, ffn_chunks=4, vocab_chunk=20)
    ctx = context(SMALL, layout)
    stages = build_stages(SMALL, layout)
    counts = [len(make_plan(stages, "budget", ctx, b * KB).groups) for b in (48, 160, 2048)]
    assert counts[0] > counts[1] > counts[2]


def test_infeasible_budget_names_the_stage_and_the_budget_that_works():
    layout = ChunkLayout.create(SMALL, ffn_chunks=1, vocab_chunk=101)
    ctx = context(SMALL, layout)
    stages = build_stages(SMALL, layout)
    with pytest.raises(InfeasibleBudget) as error:
        make_plan(stages, "budget", ctx, 8 * KB)
    message = str(error.value)
    assert "schedule.budget_mb=" in message and "stage " in message
    assert "L0.ffn.0" in message  # the largest stage sets the slab size
    smallest = float(message.split("smallest budget that works with these settings is ")[1].split(" MB")[0])
    make_plan(stages, "budget", ctx, int(math.ceil(smallest * 2**20)))  # and it does work
    assert "schedule.vocab_chunk=" in message or "schedule.ffn_chunks=" in message
    # a fixed policy over its budget is refused too, before anything runs
    with pytest.raises(InfeasibleBudget, match="budget policy"):
        make_plan(stages, "layer", ctx, 200 * KB)


def test_a_budget_is_checked_against_prefill_and_scoring_passes():
    """A budget that holds decode steps but not the run's longer passes is refused before
    anything runs, naming the pass and a prefill_block with which the same plan fits; the
    budget policies pack groups so that every pass fits."""
    layout = ChunkLayout.create(SMALL, ffn_chunks=4, vocab_chunk=20)
    stages = build_stages(SMALL, layout)
    decode_only = context(SMALL, layout)
    passes_of = lambda tokens: dataclasses.replace(  # noqa: E731
        decode_only, other_passes=((tokens, False), (tokens, True)))
    with_passes = passes_of(64)
    decode_peak = make_plan(stages, "layer", decode_only).peak_bytes
    plan = make_plan(stages, "layer", with_passes)
    assert set(plan.passes) == {"prefill", "scoring"}
    assert plan.every_pass_peak_bytes > decode_peak  # 64 tokens' activations and temporaries
    fits_16 = make_plan(stages, "layer", passes_of(16)).every_pass_peak_bytes
    assert fits_16 < plan.every_pass_peak_bytes
    with pytest.raises(InfeasibleBudget, match=r"in its (prefill|scoring) passes of 64 tokens"
                       r".*schedule.prefill_block=\d+") as error:
        make_plan(stages, "layer", with_passes, fits_16)
    hinted = int(str(error.value).split("schedule.prefill_block=")[1].split(" ")[0])
    assert 16 <= hinted < 64
    make_plan(stages, "layer", passes_of(hinted), fits_16)  # the hint works
    budget = (decode_peak + plan.every_pass_peak_bytes) // 2
    for policy in BUDGET_POLICIES:
        packed = make_plan(stages, policy, with_passes, budget)
        assert packed.every_pass_peak_bytes <= budget


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    handle = open_model("tiny")
    path = convert_checkpoint(handle, tmp_path_factory.mktemp("ckpt"), ffn_chunks=3,
                              vocab_chunk=64, progress=False)
    store = WeightStore(path, verify="off", expect_config=handle.config)
    layout = ChunkLayout(tuple(store.manifest.ffn_chunk_bounds), tuple(store.manifest.vocab_chunk_bounds))
    arrays = store.read(store.manifest.keys)
    params = jax.tree_util.tree_map(jnp.array, assemble_params(
        arrays, handle.config, list(layout.ffn_bounds), list(layout.vocab_bounds)))
    store.release(arrays)
    yield handle.config, store, layout, params
    store.close()


@pytest.mark.parametrize("policy", BUDGET_POLICIES)
@pytest.mark.parametrize("budget_kb", [96, 400])
def test_budget_policies_equal_monolithic(tiny_store, policy, budget_kb):
    config, store, layout, params = tiny_store
    kv = KVLayout("disk", "head_major", 8)
    arrays = store.manifest.arrays
    ctx = PlanContext(config=config, layout=layout, stored_bytes=store.nbytes,
                      slab_bytes_of=lambda keys: sum(-(-arrays[k].nbytes // 64) * 64 for k in keys),
                      kv_block_bytes=lambda n: read_bytes(config, kv, n, 8),
                      kv_layer_bytes=48 * stored_row_bytes(config, kv, config.n_kv_heads),
                      prefetch_depth=2, device=DEVICE, kv_len=40, kv_block=8,
                      past_rows=48, other_passes=((16, False), (16, True)))
    plan = make_plan(build_stages(config, layout), policy, ctx, budget_kb * KB)
    assert set(plan.passes) == {"prefill", "scoring"}
    assert plan.every_pass_peak_bytes <= budget_kb * KB
    tokens = [int(t) for t in np.random.default_rng(1).integers(0, config.vocab_size, 30)]
    full = np.asarray(jax.jit(forward_logits, static_argnums=0)(config, params, jnp.asarray([tokens])))[0]
    decoder = StagedDecoder(config, store, layout, policy, kv, capacity=48, prefill_block=16,
                            prefetch_depth=2, groups=plan.groups, kv_block=8)
    try:
        assert [r.peak_bytes for r in plan.rows] == [r.peak_bytes for r in decoder.plan()]
        for name, tokens_, scoring in (("prefill", 16, False), ("scoring", 16, True)):
            assert ([r.peak_bytes for r in plan.passes[name].rows]
                    == [r.peak_bytes for r in decoder.plan(tokens_, scoring)])
        np.testing.assert_allclose(decoder.prefill(tokens[:20]), full[19], atol=1e-5, rtol=0)
        for position in range(20, 30):
            np.testing.assert_allclose(decoder.step(tokens[position], position), full[position],
                                       atol=1e-5, rtol=0)
    finally:
        decoder.close()


def test_activations_on_disk_equal_monolithic_and_are_counted(tiny_store):
    config, store, layout, params = tiny_store
    kv = KVLayout("disk", "head_major", 8)
    tokens = [int(t) for t in np.random.default_rng(3).integers(0, config.vocab_size, 26)]
    full = np.asarray(jax.jit(forward_logits, static_argnums=0)(config, params, jnp.asarray([tokens])))[0]
    for policy in ("atomic", "layer"):
        decoder = StagedDecoder(config, store, layout, policy, kv, capacity=48, prefill_block=16,
                                prefetch_depth=2, kv_block=8, activations="disk")
        try:
            np.testing.assert_allclose(decoder.prefill(tokens[:20]), full[19], atol=1e-5, rtol=0)
            before = decoder.activation_store.bytes_read
            for position in range(20, 26):
                np.testing.assert_allclose(decoder.step(tokens[position], position), full[position],
                                           atol=1e-5, rtol=0)
            per_step = (decoder.activation_store.bytes_read - before) / 6
            assert per_step >= config.d_model * 4 * len(decoder.groups) // 2  # every group reads back
            log_probs = jax.nn.log_softmax(full[:20], axis=-1)
            expected = -np.take_along_axis(np.asarray(log_probs), np.asarray(tokens[1:21])[:, None], 1)[:, 0]
            np.testing.assert_allclose(decoder.token_nll(tokens[:21]), expected, atol=1e-5, rtol=0)
        finally:
            decoder.close()


@pytest.mark.parametrize("order,dtype", [("head_major", "float32"), ("token_major", "float32"),
                                         ("head_major", "int8")])
def test_scratch_bound_covers_compiled_temporaries(tiny_store, order, dtype):
    """The plan charges each group XLA's temporaries (`xla_scratch_bytes`); the compiled
    executables' own figure (`memory_analysis`) must never exceed it, for decode steps and
    prefill and scoring blocks, blocked and fused attention (whole layers and single heads), every KV
    layout, generation and scoring passes; and the bound must not be loose where it matters
    (attention over the past)."""
    config, store, layout, params = tiny_store
    kv = KVLayout("disk", order, 8, dtype)
    stages = build_stages(config, layout)
    layer = [s for s in stages if s.layer == 0]
    first_attn = next(i for i, s in enumerate(layer) if s.kind == "attn")
    # A fused group holding part of a layer's attention: its heads run one at a time.
    split = [Group(tuple(stages[:1]))] + [Group(tuple(layer[:first_attn + 1])),
                                         Group(tuple(layer[first_attn + 1:]))] + [
        Group((s,)) for s in stages[1 + len(layer):]]
    groupings = {policy: group_stages(stages, policy, config) for policy in ("atomic", "op", "layer")}
    groupings["split"] = split
    for name, groups in groupings.items():
        decoder = StagedDecoder(config, store, layout, "atomic", kv, capacity=48, prefill_block=16,
                                prefetch_depth=1, groups=groups, kv_block=8)
        try:
            for tokens, scoring in decoder.pass_kinds():
                planned = [r.scratch_bytes for r in decoder.plan(tokens, scoring)]
                compiled = decoder.temp_bytes(tokens, scoring)
                for group, bound, temp in zip(decoder.groups, planned, compiled):
                    assert temp <= bound, (name, tokens, scoring, group.id, temp, bound)
                    if tokens == 1 and any(s.kind == "attn" for s in group.stages):
                        assert bound <= 3 * temp + 4096, (name, group.id, temp, bound)
        finally:
            decoder.close()


def test_the_model_plan_is_one_resident_group_accounted_like_any_other():
    """`model` is an ordinary plan: one group of every stage, its weights held (each distinct
    array once: a tied head's chunks are the embedding's), nothing streamed or read ahead."""
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    layout = ChunkLayout.create(tied, ffn_chunks=2, vocab_chunk=40)
    stages = build_stages(tied, layout)
    ctx = context(tied, layout)
    plan = make_plan(stages, "model", ctx)
    (group,), (row,) = plan.groups, plan.rows
    assert group.resident and len(group.stages) == len(stages)
    distinct = {key for stage in stages for key in stage.weight_keys}
    assert row.weight_bytes == ctx.stored_bytes(sorted(distinct)) < ctx.stored_bytes(group.weight_keys)
    assert row.prefetch_bytes == row.buffer_bytes == 0
    assert row.peak_bytes == ctx.memory.row(group, 1).peak_bytes


def test_a_budget_plan_is_found_where_charging_the_largest_temporaries_would_fit_nothing():
    """Passes of many tokens charge each group its predecessor's temporaries. With the largest
    group's charged to every group nothing fit, though smaller groups would: the planner caps
    every group's temporaries instead, and the plan it makes is within the budget."""
    model_config = open_model("tiny").config
    layout = ChunkLayout.create(model_config, ffn_chunks=8)
    stages = build_stages(model_config, layout)
    ctx = dataclasses.replace(context(model_config, layout, kv_len=64, kv_block=64),
                              past_rows=64, other_passes=((64, True),))
    atomic_need = account("atomic", [Group((s,)) for s in stages], ctx.for_pass(64, True)).peak_bytes
    budget = 2 * atomic_need
    plan = make_plan(stages, "budget", ctx, budget)
    assert plan.every_pass_peak_bytes <= budget
    assert len(plan.groups) < len(stages)  # it fused something
