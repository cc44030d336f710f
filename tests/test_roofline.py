"""The roofline cost model, device profiles and the calibration's plumbing.

Accounting is checked against values computed by hand for the prime-sized tiny presets, the
closed forms per layer against the stage accounting and their derivatives in the FFN ratio, and
the prefetch pipeline against hand-simulated steps. No test times anything.
"""

import dataclasses
import json
import math

import pytest

from stagejax import calibration, roofline
from stagejax.devices import device_from_mapping, device_from_settings, list_devices, load_device
from stagejax.model_config import PRESETS
from stagejax.roofline import (Cost, Device, costs_over_kv, generation_time, group_cost,
                               layer_decode_weight_bytes_d2, layer_decode_weight_params_d2,
                               layer_flops_per_token_d2, model_step_cost, predict_parts,
                               predict_step, predict_time, quantized_bits, stage_cost)
from stagejax.scheduler import group_stages
from stagejax.stages import ChunkLayout, build_stages

TINY = PRESETS["tiny"].config  # llama: V 257, D 37, L 3, N 6, K 2, H 10, F 53, untied
TINY_GPT2 = PRESETS["tiny_gpt2"].config  # gpt2: V 263, D 35, L 3, N 5, H 7, F 71, tied


def stage(config, stage_id, layout=None):
    stages = build_stages(config, layout or ChunkLayout.create(config))
    return next(s for s in stages if s.id == stage_id)


def simple_device(**changes):
    fields = dict(name="toy", flops_per_s={"float32": 1e9}, mem_read_bytes_per_s=1e8,
                  storage_read_bytes_per_s=1e7, storage_warm_bytes_per_s=5e7,
                  call_overhead_s=1e-4, ram_bytes=1e9, source="test")
    return Device(**{**fields, **changes})


# ---- accounting against hand-computed values ---------------------------------------------------


@pytest.mark.parametrize("stage_id,flops,weight_bytes,kv_bytes,act_read,act_write", [
    # q head: 2*D*H matmul + RoPE 3*H; weights D*H*4; reads h [D], writes one head [H]
    ("L0.q.0", 2 * 37 * 10 + 3 * 10, 37 * 10 * 4, 0, 37 * 4, 10 * 4),
    ("L0.v.1", 2 * 37 * 10, 37 * 10 * 4, 0, 37 * 4, 10 * 4),  # no RoPE on values
    # one head over S=5 past keys plus its own: 6 keys x (4H + 5 softmax); K and V of 5 rows
    ("L1.attn.3", 6 * (4 * 10 + 5), 0, 2 * 5 * 10 * 4, (10 + 10 + 10) * 4, 10 * 4),
    # output projection N*H -> D plus the residual add
    ("L0.o", 2 * 60 * 37 + 37, 60 * 37 * 4, 0, (60 + 37) * 4, 37 * 4),
    # SwiGLU, one chunk of the whole F=53: 2*3*D*F + silu*up 5F + residual D
    ("L2.ffn.0", 2 * 3 * 37 * 53 + 5 * 53 + 37, 3 * 37 * 53 * 4, 0, 2 * 37 * 4, 37 * 4),
    ("L0.attn_norm", 4 * 37, 37 * 4, 0, 37 * 4, 37 * 4),  # RMSNorm: 4 FLOPs per element
    # untied LM head, whole vocabulary, last token only: writes V logits
    ("head.0", 2 * 257 * 37, 257 * 37 * 4, 0, 37 * 4, 257 * 4),
    ("embed", 0, 37 * 4, 0, 0, 37 * 4),  # one row of the table
])
def test_llama_stage_accounting_by_hand(stage_id, flops, weight_bytes, kv_bytes, act_read, act_write):
    cost = stage_cost(stage(TINY, stage_id), TINY, tokens=1, kv_len=5)
    assert (cost.flops, cost.weight_bytes, cost.kv_bytes) == (flops, weight_bytes, kv_bytes)
    assert (cost.act_read_bytes, cost.act_write_bytes, cost.n_calls) == (act_read, act_write, 1)


@pytest.mark.parametrize("stage_id,flops,weight_bytes", [
    ("L0.q.0", 2 * 35 * 7 + 7, (35 * 7 + 7) * 4),  # bias, no RoPE
    ("L0.attn_norm", 7 * 35, 2 * 35 * 4),  # LayerNorm: 7 FLOPs per element, scale and shift
    # GELU MLP chunk 0 of F=71: 2*2*D*F + up bias F + GELU 8F + residual D + down bias D
    ("L0.ffn.0", 2 * 2 * 35 * 71 + 71 + 8 * 71 + 35 + 35, (2 * 35 * 71 + 71 + 35) * 4),
    ("embed", 35, 2 * 35 * 4),  # token row + position row, added
])
def test_gpt2_stage_accounting_by_hand(stage_id, flops, weight_bytes):
    cost = stage_cost(stage(TINY_GPT2, stage_id), TINY_GPT2, tokens=1, kv_len=3)
    assert (cost.flops, cost.weight_bytes) == (flops, weight_bytes)


def test_prefill_attention_is_causal_and_bits_scale_bytes():
    # 4 tokens after 5 cached: 4*5 past + 1+2+3+4 own = 30 keys per head
    cost = stage_cost(stage(TINY, "L0.attn.0"), TINY, tokens=4, kv_len=5, kv_bits=8)
    assert cost.flops == 30 * (4 * 10 + 5)
    assert cost.kv_bytes == 2 * 5 * 10 * 1
    q = stage_cost(stage(TINY, "L0.q.0"), TINY, kv_len=0, weight_bits=quantized_bits(4, 32))
    assert q.weight_bytes == pytest.approx(37 * 10 * 4.5 / 8)
    assert quantized_bits(4, 32, zero_point=True) == 5.0  # GGUF Q4_1-like: scale + min per 32
    k = stage_cost(stage(TINY, "L0.k.1"), TINY, tokens=3, kv_len=0, kv_bits=16)
    assert k.kv_write_bytes == 3 * 10 * 2


def test_weight_bytes_override_and_chunk_layout():
    layout = ChunkLayout.create(TINY, ffn_chunks=2, vocab_chunk=100)
    ffn1 = stage(TINY, "L0.ffn.1", layout)  # columns [27, 53): 26 wide
    assert stage_cost(ffn1, TINY, kv_len=0, layout=layout).weight_bytes == 3 * 37 * 26 * 4
    assert stage_cost(ffn1, TINY, kv_len=0, layout=layout, weight_bytes=999).weight_bytes == 999
    head2 = stage(TINY, "head.2", layout)  # rows [200, 257)
    assert stage_cost(head2, TINY, kv_len=0, layout=layout).flops == 2 * 57 * 37
    embed = stage(TINY, "embed", layout)  # stored table bytes -> the rows read
    assert stage_cost(embed, TINY, tokens=2, kv_len=0, layout=layout,
                      weight_bytes=257 * 37 * 2).weight_bytes == pytest.approx(2 * 37 * 2)
    with pytest.raises(ValueError, match="pass the ChunkLayout"):
        stage_cost(ffn1, TINY, kv_len=0)  # default layout has one FFN chunk


def test_group_counts_shared_reads_once_and_attention_calls():
    stages = build_stages(TINY, ChunkLayout.create(TINY))
    groups = group_stages(stages, "op", TINY)
    attn = next(g for g in groups if g.kind == "attn_blocks" and g.stages[0].layer == 0)
    cost = group_cost(attn, TINY, kv_len=1000, kv_block=256)
    assert cost.n_calls == 4  # ceil(1000 / 256) blocks
    assert cost.kv_bytes == 2 * 1000 * 2 * 10 * 4  # each of the 2 kv groups read once
    per_head = sum(stage_cost(s, TINY, kv_len=1000).kv_bytes for s in attn.stages)
    assert per_head == 3 * cost.kv_bytes  # atomic: every head re-reads its group (G = 3)
    q_op = next(g for g in groups if g.stages[0].kind == "q")
    assert group_cost(q_op, TINY, kv_len=0).act_read_bytes == 37 * 4  # h read once, not 6 times
    layer = next(g for g in group_stages(stages, "layer", TINY) if g.stages[0].layer == 1)
    assert group_cost(layer, TINY, kv_len=1000, kv_block=256).n_calls == 1  # fused
    assert group_cost(attn, TINY, kv_len=0, kv_block=256).n_calls == 1  # the finishing call
    costs, streamed = roofline.plan_costs(groups, TINY, kv_len=1000, kv_block=256)
    assert costs[groups.index(attn)] == cost and len(streamed) == len(groups)
    assert not streamed[0] and not streamed[groups.index(attn)] and all(streamed[1:3])  # embed, attn


@pytest.mark.parametrize("config", [TINY, TINY_GPT2], ids=["llama", "gpt2"])
def test_model_step_equals_the_sum_of_its_stages(config):
    stages = build_stages(config, ChunkLayout.create(config))
    for tokens, kv_len in ((1, 7), (5, 0)):
        atomic = sum(stage_cost(s, config, tokens=tokens, kv_len=kv_len) for s in stages)
        model = model_step_cost(config, phase="decode" if tokens == 1 else "prefill",
                                tokens=tokens, kv_len=kv_len)
        assert model.flops == atomic.flops
        assert model.weight_bytes == atomic.weight_bytes
        assert model.weight_params == atomic.weight_params
        # the whole model reads each kv group once; atomic heads each read their own group
        assert model.kv_bytes * config.queries_per_kv_head == atomic.kv_bytes
        model_group = group_stages(stages, "model", config)[0]
        assert group_cost(model_group, config, tokens=tokens, kv_len=kv_len).kv_bytes == model.kv_bytes


def test_costs_over_kv_match_direct_evaluation():
    lens = [3, 4, 9, 40]
    for tokens in (1, 4):
        fast = costs_over_kv(TINY, tokens=tokens, kv_lens=lens, weight_bits=8)
        for kv, cost in zip(lens, fast):
            direct = model_step_cost(TINY, phase="decode" if tokens == 1 else "prefill",
                                     tokens=tokens, kv_len=kv, weight_bits=8)
            for f in dataclasses.fields(Cost):
                assert getattr(cost, f.name) == pytest.approx(getattr(direct, f.name))


def test_mixture_of_experts_scales_ffn():
    dense, parts = model_step_cost(TINY, kv_len=4, breakdown=True)
    moe, moe_parts = model_step_cost(TINY, kv_len=4, ffn_active_fraction=0.25, breakdown=True)
    assert moe_parts["ffn"].flops == pytest.approx(parts["ffn"].flops * 0.25)
    assert moe_parts["ffn"].weight_bytes == pytest.approx(parts["ffn"].weight_bytes * 0.25)
    prefill = model_step_cost(TINY, phase="prefill", tokens=64, ffn_active_fraction=0.25, breakdown=True)[1]
    full = model_step_cost(TINY, phase="prefill", tokens=64, breakdown=True)[1]
    touched = 1 - 0.75 ** 64  # fraction of experts 64 tokens touch
    assert prefill["ffn"].weight_bytes == pytest.approx(full["ffn"].weight_bytes * touched)


# ---- closed forms -------------------------------------------------------------------------------


def test_closed_form_derivatives_in_the_ffn_ratio():
    eps = 0.5  # the forms are affine in r: any step gives the exact derivative
    for kwargs in ({}, {"kv_ratio": 1 / 3, "head_ratio": 0.9}):
        dflops = (layer_flops_per_token_d2(2.0 + eps, **kwargs) - layer_flops_per_token_d2(2.0, **kwargs)) / eps
        dparams = (layer_decode_weight_params_d2(2.0 + eps, **kwargs)
                   - layer_decode_weight_params_d2(2.0, **kwargs)) / eps
        assert (dflops, dparams) == (6.0, 3.0)
    for bytes_per_weight in (4, 2, 0.5625):  # float32, bfloat16, int4 with scales (4.5 bits)
        dbytes = layer_decode_weight_bytes_d2(3.0, bytes_per_weight) - layer_decode_weight_bytes_d2(2.0, bytes_per_weight)
        assert dbytes == pytest.approx(3 * bytes_per_weight)
    assert layer_flops_per_token_d2(1.0, family="gpt2") - layer_flops_per_token_d2(0.0, family="gpt2") == 4.0


@pytest.mark.parametrize("n_heads,n_kv,head_dim,d", [(8, 2, 16, 128), (6, 2, 10, 37)])
def test_closed_forms_match_the_stage_accounting(n_heads, n_kv, head_dim, d):
    config = dataclasses.replace(TINY, d_model=d, n_heads=n_heads, n_kv_heads=n_kv,
                                 head_dim=head_dim, ffn_dim=3 * d)
    stages = [s for s in build_stages(config, ChunkLayout.create(config)) if s.layer == 1]
    kv_len = 11
    layer = sum(stage_cost(s, config, kv_len=kv_len, elementwise=False) for s in stages)
    matrices = layer.weight_params - 2 * d  # the two RMSNorm scales are O(d)
    kw = dict(kv_ratio=n_kv / n_heads, head_ratio=n_heads * head_dim / d)
    assert matrices == pytest.approx(layer_decode_weight_params_d2(3.0, **kw) * d * d)
    assert layer.flops == pytest.approx(
        layer_flops_per_token_d2(3.0, attended=kv_len + 1, d_model=d, **kw) * d * d)


# ---- predicted time -----------------------------------------------------------------------------


def test_predict_time_by_hand():
    device = simple_device(matvec_bytes_per_s=2e8)
    cost = Cost(flops=1e6, weight_bytes=4e6, kv_bytes=1e6, act_read_bytes=0, act_write_bytes=0, n_calls=2)
    compute_s, load_s = predict_parts(cost, device, streamed=True)
    # memory: 4e6 B / 2e8 + 1e6 B / 1e8 = 0.03 s > compute 1e6 / 1e9; + 2 calls x 1e-4
    assert compute_s == pytest.approx(0.03 + 2e-4)
    assert load_s == pytest.approx(4e6 / 5e7)  # warm: page-cache rate
    assert predict_time(cost, device, streamed=True, warm=False) == pytest.approx(0.0302 + 4e6 / 1e7)
    assert predict_time(cost, device, streamed=False) == pytest.approx(0.0302)
    compute_bound = Cost(flops=1e9, n_calls=1)
    assert predict_time(compute_bound, device, streamed=False) == pytest.approx(1.0 + 1e-4)
    with pytest.raises(ValueError, match="no FLOP/s figure for dtype 'int8'"):
        predict_time(cost, device, streamed=False, dtype="int8")


def unit_costs(device, loads, computes):
    """Costs whose predicted load / compute times are exactly `loads` / `computes` seconds."""
    return [Cost(flops=c * device.flops_per_s["float32"], weight_bytes=l * device.storage_warm_bytes_per_s,
                 n_calls=0) for l, c in zip(loads, computes)]


def test_prefetch_pipeline_by_hand():
    device = simple_device(mem_read_bytes_per_s=1e30, matvec_bytes_per_s=1e30)  # compute = FLOPs
    loader_bound = unit_costs(device, [2, 2, 2], [1, 1, 1])
    compute_bound = unit_costs(device, [1, 1, 1], [2, 2, 2])
    streamed = [True] * 3
    assert predict_step(loader_bound, streamed, device, prefetch_depth=0).total_s == pytest.approx(9)
    # depth >= 1, steady state, the executor only waiting: the slower resource sets the step
    for depth in (1, 2):
        assert predict_step(loader_bound, streamed, device, prefetch_depth=depth,
                            share_reads=False).total_s == pytest.approx(6)
        assert predict_step(compute_bound, streamed, device, prefetch_depth=depth,
                            share_reads=False).total_s == pytest.approx(6)
    # one long load (5 s) behind a short compute; depth 1 can start it only when the unit
    # before it starts computing. Steady state by hand: 2 + 4 (waiting for the load) + 1 = ...
    mixed = unit_costs(device, [1, 5], [3, 1])
    one = predict_step(mixed, [True, True], device, prefetch_depth=1, share_reads=False)
    # Cycle: A computes 3 s while B loads (5 s, started when A started): B waits 2 s, computes
    # 1 s; A's next load (1 s) started when B started, done before B ends: step = 3 + 2 + 1.
    assert one.total_s == pytest.approx(6)
    assert sum(one.per_group_s) == pytest.approx(one.total_s)
    assert one.compute_s == pytest.approx(4) and one.load_s == pytest.approx(6)
    assert one.io_wait_s == pytest.approx(2)
    # a group that streams nothing computes in place
    assert predict_step(unit_costs(device, [0, 3], [1, 1]), [False, True], device,
                        prefetch_depth=0).total_s == pytest.approx(5)
    with pytest.raises(ValueError, match="streamed flags"):
        predict_step(mixed, [True], device, prefetch_depth=1)


def test_shared_reads_by_hand():
    """With share_reads the executor reads the next unstarted unit instead of waiting."""
    device = simple_device(mem_read_bytes_per_s=1e30, matvec_bytes_per_s=1e30)
    # Two 2 s loads, no compute, depth 2: the loader reads one, the executor the other.
    loads_only = unit_costs(device, [2, 2], [0, 0])
    assert predict_step(loads_only, [True, True], device, prefetch_depth=2).total_s == pytest.approx(2)
    assert predict_step(loads_only, [True, True], device, prefetch_depth=2,
                        share_reads=False).total_s == pytest.approx(4)
    # depth 1 leaves one unit in flight: only the loader or the executor reads at a time
    assert predict_step(loads_only, [True, True], device, prefetch_depth=1).total_s == pytest.approx(4)
    # Loads [2, 2, 2], computes [1, 1, 1], depth 2: without sharing the loader sets the step
    # (6 s); sharing splits 6 s of copies over two threads, but only the executor computes.
    three = unit_costs(device, [2, 2, 2], [1, 1, 1])
    shared = predict_step(three, [True] * 3, device, prefetch_depth=2).total_s
    alone = predict_step(three, [True] * 3, device, prefetch_depth=2, share_reads=False).total_s
    assert alone == pytest.approx(6)
    assert max(3.0, (6 + 3) / 2) <= shared < alone  # two threads share 6 s of copies


def test_streamed_plans_use_the_contended_rates():
    device = simple_device(mem_read_bytes_per_s=1e30, matvec_bytes_per_s=1e30)
    costs = unit_costs(device, [2, 2], [0, 0])
    slow = dataclasses.replace(device, copy_contended_fraction=0.5)
    depth1 = dict(prefetch_depth=1, share_reads=False)
    assert predict_step(costs, [True, True], slow, **depth1).total_s == pytest.approx(
        2 * predict_step(costs, [True, True], device, **depth1).total_s)
    # no loader thread (depth 0) or a cold cache: the uncontended rates
    assert predict_step(costs, [True, True], slow, prefetch_depth=0).total_s == pytest.approx(4)
    assert predict_step(costs, [True, True], slow, prefetch_depth=1, warm=False).total_s == \
        predict_step(costs, [True, True], device, prefetch_depth=1, warm=False).total_s


def test_generation_time_adds_prefill_and_decode_steps():
    device = simple_device()
    out = generation_time(TINY, device, prompt_tokens=8, new_tokens=3)
    prefill = predict_time(model_step_cost(TINY, phase="prefill", tokens=8), device, streamed=False)
    decode = sum(predict_time(model_step_cost(TINY, kv_len=k), device, streamed=False) for k in (8, 9, 10))
    assert out["prefill_s"] == pytest.approx(prefill)
    assert out["decode_s"] == pytest.approx(decode)
    assert out["total_s"] == pytest.approx(prefill + decode)


# ---- devices ------------------------------------------------------------------------------------


def test_published_profiles_load_and_cite_sources():
    names = list_devices()
    for required in ("this_machine", "jetson_orin_nano", "jetson_agx_orin", "raspberry_pi_5",
                     "snapdragon_8_gen3"):
        assert required in names
    for name in names:
        if name == "this_machine":
            continue
        device = load_device(name)
        assert device.source and device.notes, name
        assert {"float32", "int8"} <= set(device.flops_per_s), name
        assert device.storage_read_bytes_per_s < device.mem_read_bytes_per_s, name


def test_bad_profiles_are_refused_clearly(tmp_path):
    good = {"name": "x", "source": "s", "flops_per_s": {"float32": 1e9}, "mem_read_bytes_per_s": 1e9,
            "storage_read_bytes_per_s": 1e8, "storage_warm_bytes_per_s": 1e9,
            "call_overhead_s": 1e-5, "ram_bytes": 1e9}
    assert device_from_mapping(good, "test").ram_bytes == 1e9
    with pytest.raises(ValueError, match="unknown keys \\['mem_bw'\\]"):
        device_from_mapping({**good, "mem_bw": 1}, "test")
    with pytest.raises(ValueError, match="lacks \\['ram_bytes'\\]"):
        device_from_mapping({k: v for k, v in good.items() if k != "ram_bytes"}, "test")
    with pytest.raises(ValueError, match="mem_read_bytes_per_s must be a number"):
        device_from_mapping({**good, "mem_read_bytes_per_s": "fast"}, "test")
    with pytest.raises(ValueError, match="must be positive"):
        device_from_mapping({**good, "storage_read_bytes_per_s": 0}, "test")
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_device(path)
    with pytest.raises(FileNotFoundError, match="known profiles: .*raspberry_pi_5"):
        load_device("no_such_device")
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in good.items()))
    assert load_device(path).name == "x"
    assert device_from_settings({**good, "calibrated": False, "matvec_bytes_per_s": None}).name == "x"


def fake_probes():
    m = lambda value, unit="bytes/s": calibration.Measurement(value, 0.01, value, value, 3, unit, "fake")
    return {"mem_read": m(2e10), "matmul_f32_1024": m(1e11, "FLOP/s"),
            "matmul_bf16_1024": m(5e10, "FLOP/s"), "matvec_576x1536": m(4e10),
            "matvec_2048x8192": m(1.5e10), "storage_cold": m(1e9), "storage_warm": m(1e10),
            "call_overhead": m(1e-5, "s")}


def test_calibration_is_cached_per_machine(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(calibration, "run_probes",
                        lambda cache_dir, quick=False, progress=None: calls.append(quick) or fake_probes())
    device = calibration.calibrate(tmp_path, quick=True)
    assert device.mem_read_bytes_per_s == 2e10 and device.matvec_bytes_per_s == 1.5e10
    assert device.flops_per_s == {"float32": 1e11, "bfloat16": 5e10}
    record = json.loads(calibration.calibration_path(tmp_path).read_text())
    assert record["quick"] and record["probes"]["mem_read"]["spread"] == 0.01
    assert calibration.calibrate(tmp_path, quick=True) == device and calls == [True]  # cached
    calibration.calibrate(tmp_path)  # a full calibration does not reuse a quick one
    assert calls == [True, False]
    calibration.calibrate(tmp_path, force=True)
    assert calls == [True, False, False]
    (tmp_path / "device.yaml").write_text("name: here\ncalibrated: true\nsource: s\n")
    assert load_device(tmp_path / "device.yaml", tmp_path).name == "here"
    assert calls == [True, False, False]


def test_memory_probe_and_storage_probe_run(tmp_path):
    bandwidth, spread = calibration.measure_memory_read_bandwidth(64 << 20, repeats=3)
    assert bandwidth > 1e8 and 0 <= spread < 10
    cold, warm = calibration.storage_probe(tmp_path, 8 << 20, 1, 2, chunk_bytes=1 << 20)
    assert cold.value > 0 and warm.value > 0 and warm.repeats == 2
    assert not list(tmp_path.glob(".storage-probe-*"))  # the probe file is removed
    with pytest.raises(ValueError, match="64 MiB"):
        calibration.measure_memory_read_bandwidth(1 << 20)
    m = calibration.Measurement.of([3.0, 1.0, 2.0], "s", "t")
    assert (m.value, m.best, m.worst) == (2.0, 1.0, 3.0)  # for times, best is the shortest
    assert math.isclose(m.spread, 0.5)
