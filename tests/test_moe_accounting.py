"""MoE accounting: hand counts of a small dense and a small MoE config under both accountings,
the Table 4 derivatives from the counts, and the per-operator roofline."""

import numpy as np
import pytest

from stagejax import codesign_theory as theory
from stagejax.devices import load_device
from stagejax.moe_accounting import (FP16, INT8, MoEArchitecture, decode_counts, generation_latency,
                                     layer_coefficients, layer_params, memory_bytes, model_params,
                                     pass_times_s, prefill_counts)

# d = 128, 4 query heads of 32, 2 kv heads (d_m = 64), dense SwiGLU of 3·128 = 384, vocab 97.
DENSE = MoEArchitecture(depth=2, width=128, n_heads=4, n_kv_heads=2, head_dim=32,
                        expert_ffn_ratio=3.0, vocab=97)
# 4 experts of 0.5·128 = 64, 2 active (ρ = 0.5, r = 1), one kv head (d_m = 32).
MOE = MoEArchitecture(depth=2, width=128, n_heads=4, n_kv_heads=1, head_dim=32,
                      expert_ffn_ratio=0.5, n_experts=4, top_k=2, vocab=97)


def test_dense_hand_counts():
    # q, o: 128·128 = 16,384 each; k, v: 128·64 = 8,192 each; SwiGLU 3·3·128² = 147,456
    assert layer_params(DENSE, "paper", active=False) == 16384 * 2 + 8192 * 2 + 147456 == 196608
    assert model_params(DENSE, "paper") == 2 * 196608
    # full: + two RMSNorm scales per layer, the final norm, the tied 97 x 128 embedding
    assert model_params(DENSE, "full") == 2 * (196608 + 256) + 128 + 97 * 128 == 406272
    assert model_params(DENSE, "paper", active=True) == model_params(DENSE, "paper")
    # one decode step over a cache of 10 keys (the first decode step after a 9-token prompt)
    step = decode_counts(DENSE, "paper", prompt_tokens=9, new_tokens=1)
    per_layer_flops = 2 * 16384 * 2 + 2 * 8192 * 2 + 2 * 10 * 128 * 2 + 5 * 4 * 10 + 2 * 147456
    assert step.total("flops")[0] == 2 * per_layer_flops == 797072
    assert step.total("weights")[0] == 2 * 196608
    assert step.total("kv")[0] == 2 * (2 * 10 * 64)  # K and V rows of 64 each, per layer
    assert step.total("activations")[0] == 0  # the paper counts no activation traffic
    # prefill of 9 tokens: the paper's full 9 x 9 attention square
    pre = prefill_counts(DENSE, "paper", 9)
    assert pre.total("flops")[0] == 2 * (9 * (2 * 16384 * 2 + 2 * 8192 * 2 + 2 * 147456)
                                         + 2 * 2 * 81 * 128 + 5 * 4 * 81)


def test_moe_hand_counts():
    assert (MOE.expert_ratio, MOE.ffn_ratio, MOE.kv_width, MOE.gqa) == (0.5, 1.0, 32, 4.0)
    attention = 16384 * 2 + 4096 * 2  # q, o 128·128; k, v 128·32
    assert layer_params(MOE, "paper", active=False) == attention + 3 * 64 * 128 * 4 == 139264
    assert layer_params(MOE, "paper", active=True) == attention + 3 * 64 * 128 * 2 == 90112
    # full: + norms (256) + router 128 x 4 (512) per layer
    assert layer_params(MOE, "full", active=False) == 139264 + 256 + 512
    step = decode_counts(MOE, "paper", prompt_tokens=9, new_tokens=1)
    ffn = step.names.index("gate")
    assert step.weights[ffn, 0] == 2 * 64 * 128 * 2  # K = 2 active experts' gate, 2 layers
    assert step.flops[ffn, 0] == 2 * 2 * 64 * 128 * 2
    # memory holds every expert, a decode step reads the active ones
    assert memory_bytes(MOE, FP16, "paper", context_tokens=10) == 2 * 139264 * 2
    assert step.total("weights")[0] == model_params(MOE, "paper", active=True)
    full = decode_counts(MOE, "full", prompt_tokens=9, new_tokens=1)
    router = full.names.index("router")
    assert full.weights[router, 0] == 2 * 128 * 4 and full.flops[router, 0] == 2 * 4 * (2 * 128 + 5)
    # full decode reads the active weights, the embedding row and the tied head (V·d) once more
    assert full.total("weights")[0] == pytest.approx(model_params(MOE, "full", active=True) + 128)


@pytest.mark.parametrize("accounting", ["paper", "full"])
def test_table4_derivatives_from_the_accounting(accounting):
    """∂ξ_F/∂r = 6, ∂ξ_W^dec/∂r = 3, ∂ξ_W^all/∂r = 3/ρ, ∂ξ/∂(1/gqa) = 4, 2, 2 (Table 4), as
    secants of the counts (affine in r and 1/gqa); the full accounting adds O(1/d) terms."""
    def coeffs(r_single, n_kv, n_experts=8):
        arch = MoEArchitecture(4, 2048, 32, n_kv, 64, r_single, n_experts, 1)
        return layer_coefficients(arch, accounting, FP16)

    base, more_r, fewer_kv = coeffs(1.0, 8), coeffs(2.0, 8), coeffs(1.0, 4)
    tol = 0 if accounting == "paper" else 1e-2  # full: + SwiGLU's 5/d, RoPE's 3/d, ...
    assert more_r["xi_F"] - base["xi_F"] == pytest.approx(6.0, abs=tol + 1e-9)
    assert more_r["xi_W_dec"] - base["xi_W_dec"] == pytest.approx(3.0, abs=1e-9)
    assert more_r["xi_W_all"] - base["xi_W_all"] == pytest.approx(3.0 * 8, abs=1e-9)  # 3/ρ, ρ = 1/8
    inv_gqa_step = 1 / 4 - 1 / 8
    assert (base["xi_F"] - fewer_kv["xi_F"]) / inv_gqa_step == pytest.approx(4.0, abs=tol + 1e-9)
    assert (base["xi_W_dec"] - fewer_kv["xi_W_dec"]) / inv_gqa_step == pytest.approx(2.0, abs=1e-9)
    assert (base["xi_W_all"] - fewer_kv["xi_W_all"]) / inv_gqa_step == pytest.approx(2.0, abs=1e-9)
    if accounting == "paper":  # the closed forms of Eq. 25-26 exactly, and Γ = ξ_W^dec + δ
        assert base["xi_W_dec"] == pytest.approx(theory.xi_decode_weights(1.0, 4))
        assert base["xi_W_all"] == pytest.approx(theory.xi_all_weights(1.0, 4, 1 / 8))
        delta = theory.kv_delta(theory.mean_context(1024, 16), 4, 2048, 2, 2)
        assert base["Gamma"] == pytest.approx(base["xi_W_dec"] + delta)


def test_per_operator_roofline():
    device = load_device("jetson_orin_nano")
    step = decode_counts(DENSE, "paper", prompt_tokens=100, new_tokens=3)
    times = pass_times_s(step, device, FP16)
    expected = np.maximum(step.flops / device.peak_flops("float16"),
                          step.bytes(FP16) / device.mem_read_bytes_per_s).sum(axis=0)
    np.testing.assert_allclose(times, expected)
    assert times[0] < times[1] < times[2]  # the cache grows by one key per step
    fp16 = generation_latency(MOE, device, FP16, prompt_tokens=64, new_tokens=4)
    int8 = generation_latency(MOE, device, INT8, prompt_tokens=64, new_tokens=4)
    assert fp16["total_s"] == pytest.approx(fp16["prefill_s"] + fp16["decode_s"])
    assert int8["decode_s"] == pytest.approx(fp16["decode_s"] / 2)  # half the bytes, memory-bound
    # storing more experts at the same active count costs memory, not decode time (paper)
    wider = MoEArchitecture(**{**MOE.__dict__, "n_experts": 8})
    assert generation_latency(wider, device, FP16, prompt_tokens=64, new_tokens=4)["decode_s"] == \
        pytest.approx(fp16["decode_s"])
    assert model_params(wider, "paper") > model_params(MOE, "paper")


def test_bad_architectures_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        MoEArchitecture(2, 128, 4, 1, 32, 1.0, n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        MoEArchitecture(2, 128, 4, 3, 32, 1.0)
    with pytest.raises(ValueError, match="accounting"):
        model_params(DENSE, "approximate")
