"""Staged == monolithic for every knob a user can set, all-pairs (the cases and the checker are
`tests/knob_matrix.py`), the checker's own power (mutation tests), and the slow tier: SmolLM2
for every schedule x {none, int8, gguf_native} x {ram, disk, disk_int8}, perplexity across
schedules, and measured decode memory against the plan."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

import knob_matrix as km
from stagejax import stage_kinds
from stagejax.evaluation import perplexity_llama_cpp
from stagejax.engine import ScheduleRun
from stagejax.sampling import SamplingConfig

CASES = km.pairwise_cases()


@pytest.fixture(scope="module", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """Cases compile many executables with equal HLO (FFN chunks, norms, heads): JAX's
    persistent cache, in a directory of this module's own, compiles each once."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {key: getattr(jax.config, key) for key in keys}
    compilation_cache.reset_cache()
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla")))
    jax.config.update(keys[1], 0.0)
    jax.config.update(keys[2], 0)
    yield
    for key, value in before.items():
        jax.config.update(key, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def matrix_models(tmp_path_factory):
    """Each family's tiny model, built on first use."""
    models: dict[str, km.MatrixModel] = {}

    def get(family: str) -> km.MatrixModel:
        if family not in models:
            models[family] = km.MatrixModel(family, tmp_path_factory.mktemp(f"matrix-{family}"))
        return models[family]

    yield get
    for model in models.values():
        model.close()


def test_the_cases_hold_every_pair_of_knob_values():
    assert km.uncovered_pairs(CASES) == []
    assert len({case.id for case in CASES}) == len(CASES)
    refused = [case for case in CASES if case.refusal() is not None]
    assert refused and all(case.reader == "native" and case.depth == 0 for case in refused)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_staged_equals_monolithic(case, matrix_models):
    km.check_case(case, matrix_models(case.family))


@pytest.mark.parametrize("family", km.KNOBS["family"])
def test_the_models_attend_far_from_uniformly(family, matrix_models):
    """Scaled weights: layer 0's attention entropy well below the uniform one's (~1.0 with the
    initializer's weights, where position and kv-group errors barely move the logits)."""
    model = matrix_models(family)
    reference = model.reference("none", "float32")
    entropy = km.attention_entropy(model.config, model.resident_params("none"), reference.tokens)
    assert entropy < 0.7, entropy


# ---- mutation tests: the checker fails on the bugs it is there to catch ----------------------

MUTATED = km.Case(schedule="layer", quant="none", cache="disk", depth=1, reader="python",
                  family="llama")


def test_the_unmutated_mutation_case_passes(matrix_models):
    km.check_case(MUTATED, matrix_models("llama"))


def test_a_rope_offset_by_one_position_in_one_head_is_caught(matrix_models, monkeypatch):
    q_fn = stage_kinds.KINDS["q"].fn

    def off_by_one(config, state, weights, ctx, index):
        shifted = ctx["positions"] + (index == 1).astype(ctx["positions"].dtype)  # head 1 only
        return q_fn(config, state, weights, {**ctx, "positions": shifted}, index)

    monkeypatch.setitem(stage_kinds.KINDS, "q", dataclasses.replace(stage_kinds.KINDS["q"], fn=off_by_one))
    with pytest.raises(AssertionError, match="staged differs from monolithic"):
        km.check_case(MUTATED, matrix_models("llama"))


def test_a_swapped_kv_group_is_caught(matrix_models, monkeypatch):
    """Keys and values of kv groups 0 and 1 written into each other's slots."""
    for kind in ("k", "v"):
        original = stage_kinds.KINDS[kind].fn

        def swapped(config, state, weights, ctx, index, original=original):
            other = jnp.where(index == 0, 1, jnp.where(index == 1, 0, index)).astype(index.dtype)
            return original(config, state, weights, ctx, other)

        monkeypatch.setitem(stage_kinds.KINDS, kind, dataclasses.replace(stage_kinds.KINDS[kind], fn=swapped))
    with pytest.raises(AssertionError, match="staged differs from monolithic"):
        km.check_case(MUTATED, matrix_models("llama"))


@pytest.mark.parametrize("quant, key", [("int4_g32", "L0/ffn/1/up_i4"),
                                        ("gguf_native", "L1/o/w_q4_1")])
def test_a_flipped_nibble_in_a_quantized_block_is_caught(matrix_models, quant, key):
    """One stored 4-bit value of one block inverted (q -> 15 - q, one chosen at least 7 steps
    away) in the bytes the staged path streams; the monolithic model keeps the stored ones."""
    case = dataclasses.replace(MUTATED, quant=quant)
    model = matrix_models("llama")
    assert key in model.store(quant).manifest.arrays

    def flip_a_nibble(decoder):
        prefetcher = decoder.prefetcher
        next_unit = prefetcher.next

        def next_with_a_flip():
            arrays = next_unit()
            if key in arrays:
                data = arrays[key]
                # data bytes of the first block: Q4_1 blocks start with two float16 (d, m)
                first = 4 if quant == "gguf_native" else 0
                low = data[first:first + 16, 0] & 15
                row = first + int(np.argmax(np.abs(15 - 2 * low.astype(int)) >= 7))
                data[row, 0] ^= 0x0F
            return arrays

        prefetcher.next = next_with_a_flip

    if quant == "int4_g32":  # unmutated, it passes (gguf_native's twin is a matrix case)
        km.check_case(case, model)
    with pytest.raises(AssertionError, match="staged differs from monolithic"):
        km.check_case(case, model, mutate=flip_a_nibble)


# ---- measured decode memory against the plan -----------------------------------------------

# Runtime allocations outside the plan's terms (as tests/test_staged.py allows a staged run).
MEMORY_ALLOWANCE_BYTES = 8 * 2**20


def decode_memory(tmp_path, *overrides, schedule="atomic", ppl_chunks=0, run_name="run") -> dict:
    """A run of the main job in a fresh process; its metrics."""
    run_dir = tmp_path / run_name
    completed = subprocess.run(
        [sys.executable, "-m", "stagejax.run", f"schedule={schedule}", "cache=ram", f"eval.ppl_chunks={ppl_chunks}",
         "decode.max_new_tokens=8", "tracking.mode=disabled", f"hydra.run.dir={run_dir}", *overrides],
        cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


def test_quantized_decode_with_the_cache_in_ram_stays_within_its_plan(tmp_path):
    """The matrix's tiny Llama from its GGUF, Q4_1 blocks streamed as they are, KV in RAM: the
    decode's working set within the plan (which counts the dequantized temporaries and the
    resident cache) plus the allowance."""
    source = km.write_gguf(tmp_path / "tiny.gguf", km.FAMILY_CONFIGS["llama"],
                           km.scaled_params(km.FAMILY_CONFIGS["llama"]))
    metrics = decode_memory(tmp_path, "model=tiny", f"model.path={source}", "quant=gguf_native",
                            "schedule.ffn_chunks=3", "schedule.kv_block=16",
                            f"paths.cache={tmp_path / 'cache'}",
                            schedule="layer")  # a layer's blocks and dequantized matrices at once
    planned, measured = metrics["planned_peak_bytes"], metrics["decode_working_set_bytes"]
    assert metrics["quant"] == "gguf_native" and metrics["cache"] == "ram"
    assert measured <= planned + MEMORY_ALLOWANCE_BYTES, (measured / 2**20, planned / 2**20)


def test_a_long_context_in_ram_stays_within_its_plan(tmp_path):
    """A KV cache in RAM large enough to matter (4 layers x 4 kv heads of 64, a 3,000-token
    prompt: ~23 MiB, three times the allowance) is in the plan, and the decode's measured
    working set stays within it."""
    config = dataclasses.replace(km.FAMILY_CONFIGS["llama"], n_layers=4, n_kv_heads=4,
                                 head_dim=64, max_seq_len=3100)
    source = km.write_gguf(tmp_path / "long.gguf", config, km.scaled_params(config))
    prompt_tokens = 3000
    metrics = decode_memory(tmp_path, "model=tiny", f"model.path={source}", "quant=none",
                            f"decode.prompt={'a' * (prompt_tokens - 1)}", "schedule.ffn_chunks=3",
                            f"paths.cache={tmp_path / 'cache'}", schedule="layer")
    resident_kv = config.n_layers * prompt_tokens * 2 * config.n_kv_heads * config.head_dim * 4
    planned, measured = metrics["planned_peak_bytes"], metrics["decode_working_set_bytes"]
    assert planned >= resident_kv > 2 * MEMORY_ALLOWANCE_BYTES, (planned, resident_kv)
    assert measured <= planned + MEMORY_ALLOWANCE_BYTES, (measured / 2**20, planned / 2**20)


@pytest.fixture(scope="module")
def scored_runs(tmp_path_factory):
    """Two identical runs of the main job (sharing a compile cache) that score a 2,048-token
    window in the default 64-token passes."""
    tmp_path = tmp_path_factory.mktemp("scored")
    config = dataclasses.replace(km.FAMILY_CONFIGS["llama"], n_layers=4, n_kv_heads=4,
                                 head_dim=64, max_seq_len=2100)
    source = km.write_gguf(tmp_path / "long.gguf", config, km.scaled_params(config))
    overrides = ("model=tiny", f"model.path={source}", "quant=none", "schedule.ffn_chunks=3",
                 "eval.n_ctx=2048", "decode.max_new_tokens=2", f"paths.cache={tmp_path / 'cache'}")
    return [decode_memory(tmp_path, *overrides, schedule="layer", ppl_chunks=1, run_name=name)
            for name in ("first", "second")]


def test_perplexity_stays_within_its_planned_passes(scored_runs):
    """The scoring phase (reading and tokenizing the text, then the passes) within the plan of
    its passes: the RAM cache they fill (16 MiB, twice the allowance), their activations and
    XLA temporaries, the previous group's among them."""
    for metrics in scored_runs:
        planned, measured = metrics["planned_scoring_peak_bytes"], metrics["ppl_working_set_bytes"]
        assert metrics["ppl_scored_tokens"] == 1023
        assert planned > 2 * MEMORY_ALLOWANCE_BYTES
        assert measured <= planned + MEMORY_ALLOWANCE_BYTES, (measured / 2**20, planned / 2**20)
        planned_prefill = metrics["planned_prefill_peak_bytes"]
        assert metrics["prefill_working_set_bytes"] <= planned_prefill + MEMORY_ALLOWANCE_BYTES


def test_a_second_identical_run_compiles_from_the_persistent_cache(scored_runs):
    """The first run compiles in a helper process and loads what it compiled (the compiler's
    leftovers stay out of the run's baseline); the second finds it all cached, helper and all."""
    first, second = scored_runs
    assert first["compile_helper_s"] is not None and second["compile_helper_s"] is None
    for metrics in scored_runs:
        assert metrics["compile_cache_hits"] > 0 and metrics["compile_cache_misses"] == 0
        assert metrics["ppl_compile_cache_misses"] == 0
    assert second["n_executables"] == first["n_executables"]
    assert second["ppl"] == first["ppl"]
    for metrics in scored_runs:  # the 64-token passes are planned beside the decode steps
        decode = metrics["planned_peak_bytes"]
        assert min(metrics["planned_scoring_peak_bytes"], metrics["planned_prefill_peak_bytes"]) > decode


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "gguf_native"])
def test_smollm2_quantized_decode_with_the_cache_in_ram_stays_within_its_plan(tmp_path, quant):
    metrics = decode_memory(tmp_path, "model=smollm2_135m", f"quant={quant}")
    planned, measured = metrics["planned_peak_bytes"], metrics["decode_working_set_bytes"]
    assert measured <= planned + MEMORY_ALLOWANCE_BYTES, (measured / 2**20, planned / 2**20)


# ---- slow tier: SmolLM2 ------------------------------------------------------------------------

SMOLLM2_ATOL = 5e-4  # float32 logits up to ~35 (tests/test_staged.py, as its transformers parity)
SMOLLM2_CASES = [km.Case(schedule=schedule, quant=quant, cache=cache, block_tokens=16, kv_block=16,
                         depth=2, reader="native", family="smollm2")
                 for schedule in km.KNOBS["schedule"] for quant in ("none", "int8", "gguf_native")
                 for cache in ("ram", "disk", "disk_int8")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2 converted as runs convert it by default (FFN in 8 chunks, LM head in 512-row
    chunks, in the user's checkpoint cache)."""
    model = km.MatrixModel("llama", tmp_path_factory.mktemp("smollm2"), preset="smollm2_135m",
                           ffn_chunks=8, vocab_chunk=512, atol=SMOLLM2_ATOL, lossy_sensitivity=True)
    yield model
    model.close()


@pytest.mark.slow
@pytest.mark.parametrize("case", SMOLLM2_CASES, ids=lambda case: case.id)
def test_smollm2_staged_equals_monolithic(case, smollm2):
    km.check_case(case, smollm2)


@pytest.mark.slow
def test_smollm2_two_chunk_perplexity_is_equal_across_schedules(smollm2):
    """llama.cpp's procedure, 2 chunks of 128 tokens of wiki.test.raw, through each schedule's
    own scoring path: the mean NLL of every schedule equals the monolithic one's (each token's
    NLL is a log-sum-exp minus a logit, each within the logit tolerance)."""
    from stagejax import data
    from stagejax.decode import token_nll

    n_ctx, n_chunks = 128, 2
    tokens = smollm2.handle.tokenizer.encode(data.read_text("wikitext-2/wiki.test.raw")[:20000])
    params = smollm2.resident_params("none")
    nll = jax.jit(lambda window: token_nll(smollm2.config, params, window))
    monolithic = perplexity_llama_cpp(lambda w: nll(jnp.asarray(w)), tokens, n_ctx, n_chunks,
                                      progress=False)
    del params
    store = smollm2.store("none")
    for schedule in km.KNOBS["schedule"]:
        case = km.Case(schedule=schedule, quant="none", cache="disk", block_tokens=16,
                       kv_block=16, depth=2, reader="native", family="smollm2")
        settings = smollm2.settings(case, prefill_block=64)
        run = ScheduleRun(settings, smollm2.handle, store, n_ctx, n_ctx, SamplingConfig())
        try:
            staged = perplexity_llama_cpp(run.nll_fn(), tokens, n_ctx, n_chunks, progress=False)
        finally:
            run.close()
        assert staged.n_scored_tokens == monolithic.n_scored_tokens
        assert abs(staged.mean_nll - monolithic.mean_nll) <= 2 * SMOLLM2_ATOL, (
            schedule, staged.ppl, monolithic.ppl)
