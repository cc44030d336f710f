"""Co-design search: the Pareto filter on a known set, budgets, parameter counts, latency
structure, mixture-of-experts and the staged-decoding estimate."""

import math

import pytest

from stagejax import codesign
from stagejax.codesign import (Architecture, DesignPoint, Workload, architecture_grid, best_under,
                               memory_bytes, pareto_front, predict_latency, predict_loss, search,
                               staged_plan)
from stagejax.devices import load_device
from stagejax.fitting import CHINCHILLA, PowerLawN
from stagejax.roofline import model_step_cost

SMOLLM2 = Architecture(depth=30, width=576, ffn_ratio=1536 / 576, n_heads=9, n_kv_heads=3,
                       head_dim=64, vocab=49152, weight_bits=32, kv_bits=32)
SMALL = Architecture(depth=4, width=256, ffn_ratio=4, n_heads=4, n_kv_heads=2, head_dim=64,
                     vocab=1000, weight_bits=16)
WORKLOAD = Workload(prompt_tokens=64, new_tokens=4)


def test_pareto_front_of_a_known_set():
    points = [(1, 5), (2, 4), (2, 6), (3, 4), (4, 1), (5, 1), (0.5, 10), (4, 1), (6, 0.5)]
    assert pareto_front(points) == [(0.5, 10), (1, 5), (2, 4), (4, 1), (6, 0.5)]
    assert pareto_front([]) == []
    # a custom key: objects with other attribute names
    assert pareto_front([{"t": 1, "l": 2}, {"t": 2, "l": 3}], key=lambda p: (p["t"], p["l"])) == [{"t": 1, "l": 2}]


def point(latency, loss, memory, staged_latency=None):
    staged = None
    if staged_latency is not None:
        staged = codesign.StagedPlan("streamed", 100.0, 90.0, 10.0, 3, 30.0, staged_latency, 0.0)
    return DesignPoint(SMALL, latency, latency / 2, latency / 2, loss, memory, staged)


def test_best_under_budgets():
    front = [point(1.0, 3.0, 10), point(2.0, 2.5, 50), point(3.0, 2.0, 500)]
    assert best_under(front, 2.5, 100) is front[1]
    assert best_under(front, 10.0, 1000) is front[2]
    assert best_under(front, 10.0, 20) is front[0]
    assert best_under(front, 0.5, 1000) is None
    staged = [point(1.0, 3.0, 10, 1.5), point(2.0, 2.5, 500, 4.0)]
    assert best_under(staged, 5.0, 100, staged=True) is staged[1]  # staged peak 90 <= 100
    with pytest.raises(ValueError, match="RAM budget"):
        best_under(front, 1.0, staged=True)


def test_parameter_counts():
    # SmolLM2-135M, tied embeddings: 30 x 3,540,096 per layer + final norm + 49152 x 576
    assert SMOLLM2.params_total == 134_515_008
    assert SMOLLM2.params_non_embedding == 134_515_008 - 49152 * 576
    # a decode step reads every weight once, plus the token's embedding row
    decode = model_step_cost(SMOLLM2.model_config(), kv_len=10)
    assert decode.weight_params == SMOLLM2.params_total + SMOLLM2.width
    moe = Architecture(4, 256, 4, 4, 2, 64, 1000, 16, moe_active_fraction=0.25)
    ffn = 4 * 3 * 256 * 1024
    assert moe.params_total == SMALL.params_total and moe.params_active == SMALL.params_total - 0.75 * ffn
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        Architecture(4, 256, 4, 4, 3, 64, 1000, 16)


def test_latency_structure_and_memory_bound_decode():
    device = load_device("raspberry_pi_5")
    latency = predict_latency(SMOLLM2, device, WORKLOAD)
    assert latency["total_s"] == pytest.approx(latency["prefill_s"] + latency["decode_s"])
    # batch-1 decode is memory-bound: each step ~ the weight bytes over the bandwidth
    per_step = latency["decode_s"] / WORKLOAD.new_tokens
    assert per_step == pytest.approx(SMOLLM2.weight_bytes / device.mem_read_bytes_per_s, rel=0.05)
    low_bit = Architecture(**{**SMOLLM2.__dict__, "weight_bits": 4.5})
    assert predict_latency(low_bit, device, WORKLOAD)["decode_s"] < latency["decode_s"] / 4
    moe = Architecture(**{**SMOLLM2.__dict__, "moe_active_fraction": 0.25})
    assert predict_latency(moe, device, WORKLOAD)["decode_s"] < latency["decode_s"]
    assert memory_bytes(moe, WORKLOAD) == memory_bytes(SMOLLM2, WORKLOAD)  # all experts resident


def test_predict_loss_conventions():
    assert predict_loss(SMALL) == pytest.approx(CHINCHILLA(SMALL.params_total, 20 * SMALL.params_total))
    assert predict_loss(SMALL, training_tokens=1e9) == pytest.approx(CHINCHILLA(SMALL.params_total, 1e9))
    fitted = PowerLawN(2.0, 10.0, 0.2)
    assert predict_loss(SMALL, fitted, loss_params="non_embedding") == pytest.approx(
        fitted(SMALL.params_non_embedding))
    moe = Architecture(**{**SMALL.__dict__, "moe_active_fraction": 0.25})
    assert predict_loss(SMALL) < predict_loss(moe)  # fewer active parameters: higher loss


def test_staged_plan_resident_streamed_infeasible():
    device = load_device("jetson_orin_nano")
    resident = memory_bytes(SMOLLM2, WORKLOAD)
    plan = staged_plan(SMOLLM2, device, resident * 1.01, WORKLOAD)
    assert plan.mode == "resident" and plan.n_units == 1
    assert plan.total_s == pytest.approx(predict_latency(SMOLLM2, device, WORKLOAD)["total_s"])
    tight = staged_plan(SMOLLM2, device, 64e6, WORKLOAD)
    assert tight.mode == "streamed" and tight.peak_bytes <= 64e6
    # units fit the budget with 3 slabs (prefetch depth 2), so there are at least 3 x W / budget
    assert tight.n_units >= 3 * SMOLLM2.weight_bytes / 64e6
    assert tight.unit_bytes >= codesign.largest_atomic_stage_bytes(SMOLLM2) == 9 * 64 * 576 * 4
    assert tight.total_s > plan.total_s  # streaming costs time
    impossible = staged_plan(SMOLLM2, device, 1e6, WORKLOAD)
    assert impossible.mode == "infeasible" and math.isinf(impossible.total_s)
    at_minimum = staged_plan(SMOLLM2, device, impossible.min_budget_bytes, WORKLOAD)
    assert at_minimum.mode == "streamed" and at_minimum.peak_bytes <= impossible.min_budget_bytes * (1 + 1e-9)


def test_grid_and_search():
    grid = architecture_grid(depths=(2, 4), widths=(128, 192), ffn_ratios=(2, 4), kv_heads=(1, 2, 3),
                             weight_bits=(8, 16), moe_active_fractions=(1.0,), vocab=500)
    assert all(a.n_heads % a.n_kv_heads == 0 for a in grid)
    assert {a.n_kv_heads for a in grid if a.width == 128} == {1, 2}  # 2 heads: kv 3 skipped
    device = load_device("jetson_orin_nano")
    points = search(grid, device, WORKLOAD, ram_budget_bytes=2e6)
    assert len(points) == len(grid) and all(p.staged is not None for p in points)
    front = pareto_front(points)
    assert front and all(not (q.latency_s <= p.latency_s and q.loss < p.loss) for p in front for q in points)
    rows = [codesign.design_row(p) for p in front]
    assert rows[0]["staged_mode"] in ("resident", "streamed", "infeasible")
    assert codesign.markdown_table(rows).count("\n") == len(rows) + 1
    penalised = search(grid[:1], device, WORKLOAD, loss_penalty=lambda arch: 0.25)
    assert penalised[0].loss == pytest.approx(points[0].loss + 0.25)
    calls = []
    search(grid[:2], device, WORKLOAD, ram_budget_bytes=1e6,
           grouping=lambda arch, dev, budget, wl: calls.append(budget) or staged_plan(arch, dev, budget, wl))
    assert calls == [1e6, 1e6]  # the grouping estimator is one swappable call site


# ---- the co-design paper's space, search and quantization cost -----------------------

from stagejax.architecture_law import PAPER_TABLE6  # noqa: E402
from stagejax.moe_accounting import FP16, INT8, MoEArchitecture  # noqa: E402
from stagejax.quant_loss import load_quant_loss  # noqa: E402


def test_table5_space():
    space = codesign.table5_space((1.0,))
    # 8 depths x 5 (E, K) x valid (width, n_kv): n_kv = 8 does not divide n_h at d = 768, 1280,
    # 1792, 2304 (12, 20, 28, 36 heads of 64): 9 x 5 - 4 = 41
    assert len(space) == 8 * 5 * 41 == 1640
    assert len(set(space)) == len(space)
    assert all(a.n_heads % a.n_kv_heads == 0 and a.ffn_ratio == 1.0 for a in space)
    assert {a.n_kv_heads for a in space if a.width == 768} == {1, 2, 4, 12}
    assert {(a.n_experts, a.top_k) for a in space} == set(codesign.TABLE5_EXPERTS)


def test_search_moe_memory_quantization_and_fronts():
    device = load_device("jetson_orin_nano")
    quant = load_quant_loss()
    space = codesign.table5_space((0.5, 2.0), depths=(4, 16), widths=(768, 2048))
    fp16 = codesign.search_moe(space, device, FP16, quant_loss=quant,
                               memory_budget_bytes=device.ram_bytes)
    int8 = codesign.search_moe(space, device, INT8, quant_loss=quant,
                               memory_budget_bytes=device.ram_bytes)
    assert all(p.memory_bytes <= device.ram_bytes for p in fp16)
    assert len(int8) > len(fp16)  # half the bytes: more designs fit 8 GB
    # INT8 pays its measured perplexity ratio on SmolLM2 as ln(ratio) nats
    same = {p.arch: p.loss for p in fp16}
    offsets = {q.loss - same[q.arch] for q in int8 if q.arch in same}
    assert max(offsets) == pytest.approx(min(offsets)) == pytest.approx(
        math.log(quant.ratios["int8"]))
    assert quant.ratios["int8"] > 1 and quant.ratios["float16"] == 1.0
    for kind in ("prefill", "decode", "total"):
        front = codesign.moe_front(fp16, kind)
        assert all(not (q.latency(kind) <= p.latency(kind) and q.loss < p.loss)
                   for p in front for q in fp16)
    row = codesign.moe_design_row(fp16[0])
    assert row["precision"] == "fp16" and row["accounting"] == "paper"


def test_moe_loss_and_cost_under_the_paper_law():
    dense = MoEArchitecture.from_paper(16, 1024, 1.0, 1, 1, 4)
    moe = MoEArchitecture.from_paper(16, 1024, 1.0, 16, 1, 4)
    assert codesign.law_loss(moe) < codesign.law_loss(dense)  # ρ = 1/16: sparsity term shrinks
    assert codesign.law_loss(dense) == pytest.approx(PAPER_TABLE6(16, 1024, 1.0, 1.0, 256))
    device = load_device("jetson_agx_orin")
    [d, m] = codesign.search_moe([dense, moe], device, FP16)
    assert m.decode_s == pytest.approx(d.decode_s)  # same active weights and KV per step
    assert m.memory_bytes > 5 * d.memory_bytes / 2  # 16 experts stored


def test_quant_loss_offsets_and_exclusions(tmp_path):
    quant = load_quant_loss()
    assert quant.format_for_bits(4.5) == "int4_g32" and quant.format_for_bits(3.0) is None
    assert quant.loss_offset("int4_g32") == pytest.approx(math.log(1.5744792159188201))
    with pytest.raises(KeyError, match="exclude it from the search"):
        quant.loss_offset_for_bits(3.0)
    assert "float16" in quant.assumed
    (tmp_path / "summary.json").write_text('{"ppl_vs_none": {"none": 0.0, "int8": 0.01}}')
    small = load_quant_loss(tmp_path / "summary.json", float16_as_reference=False)
    assert small.ratios == {"float32": 1.0, "int8": 1.01}
    with pytest.raises(KeyError):
        small.loss_offset("float16")
