"""The co-design paper's closed forms against numerical optima of its own law and constraints."""

import math

import numpy as np
import pytest

from stagejax import codesign_theory as theory
from stagejax.architecture_law import PAPER_TABLE6 as LAW

GQA, B_W = 4.0, 2.0
S_BAR = theory.mean_context(1024, 16)


def test_eq9_recovered_on_a_grid():
    """At fixed l and d the memory constraint fixes r/ρ; the law's minimum over a fine ρ grid
    is Eq. 9, and does not depend on l or the budget."""
    rho_grid = np.geomspace(1e-3, 1.0, 20001)
    for width in (1024, 2048):
        for depth, memory in ((12, 4e9), (24, 16e9)):
            ratio = (memory / (depth * width ** 2 * B_W) - theory.alpha_attn(GQA)) / 3  # r/ρ
            losses = LAW(depth, width, ratio * rho_grid, rho_grid, width / GQA)
            best = rho_grid[np.argmin(losses)]
            assert best == pytest.approx(theory.rho_star_memory(LAW, width), rel=2e-3)
    assert theory.rho_memory_exponent(LAW) == pytest.approx(-1.19, abs=5e-3)


def test_eq9_is_the_optimum_over_depth_ffn_ratio_and_rho():
    rhos = []
    widths = (1536, 2048, 3072)
    for width in widths:
        opt = theory.optimise_architecture(LAW, width, GQA, memory_bytes=4e9, weight_bytes=B_W)
        assert opt.active == ("memory",) and not opt.at_bounds
        assert opt.expert_ratio == pytest.approx(theory.rho_star_memory(LAW, width), rel=1e-4)
        rhos.append(opt.expert_ratio)
    slope = np.polyfit(np.log(widths), np.log(rhos), 1)[0]
    assert slope == pytest.approx(theory.rho_memory_exponent(LAW), abs=1e-3)


def test_latency_only_gives_the_smallest_rho():
    opt = theory.optimise_architecture(LAW, 1024, GQA, decode_bytes=0.5e9, mean_context_tokens=S_BAR,
                                       rho_bounds=(1 / 16, 1.0))
    assert opt.expert_ratio == pytest.approx(1 / 16) and opt.active == ("decode",)


def test_eq10_solves_its_two_constraints():
    width, memory, r = 1024, 4e9, 1.0
    for eta_p in (0.2, 0.8):
        rho = theory.rho_star_prefill_memory(eta_p, B_W, r, GQA)
        l_memory = theory.depth_star_memory(memory, r, GQA, rho, width, B_W)
        l_prefill = theory.depth_star_prefill(eta_p * memory, r, GQA, width)
        assert l_memory == pytest.approx(l_prefill, rel=1e-12)


def test_eq11_as_printed_misses_the_constraints_and_the_corrected_form_meets_them():
    width, memory, r, eta = 1024, 4e9, 1.0, 0.125
    delta = theory.kv_delta(S_BAR, GQA, width, 2.0, B_W)

    def depths(rho):
        return (theory.depth_star_memory(memory, r, GQA, rho, width, B_W),
                theory.depth_star_decode(eta * memory, r, GQA, width, B_W, 2.0, S_BAR))

    corrected = theory.rho_star_decode_memory(eta, delta, r, GQA)
    printed = theory.rho_star_decode_memory_printed(eta, delta, r, GQA)
    l_memory, l_decode = depths(corrected)
    assert l_memory == pytest.approx(l_decode, rel=1e-12)
    l_memory, l_decode = depths(printed)
    assert abs(l_memory / l_decode - 1) > 0.01
    # with no KV term the quadratic degenerates to the linear equation: both agree
    assert theory.rho_star_decode_memory_printed(eta, 0.0, r, GQA) == pytest.approx(
        theory.rho_star_decode_memory(eta, 0.0, r, GQA))
    # and the law's numerical optimum under both budgets sits where the corrected form says
    opt = theory.optimise_architecture(LAW, width, GQA, memory_bytes=memory,
                                       decode_bytes=eta * memory, mean_context_tokens=S_BAR)
    assert set(opt.active) == {"memory", "decode"}
    assert opt.expert_ratio == pytest.approx(
        theory.rho_star_decode_memory(eta, delta, opt.ffn_ratio, GQA), rel=1e-6)


def test_budgets_and_bad_inputs():
    assert theory.decode_budget_bytes(0.1, 50e9, 1) == pytest.approx(5e9)
    assert theory.prefill_budget_flops(0.1, 1e13, 1, 1000) == pytest.approx(1e9)
    with pytest.raises(ValueError, match="at least one budget"):
        theory.optimise_architecture(LAW, 1024, GQA)
    flat = LAW.__class__(**{**LAW.__dict__, "alpha_rho": 0.1})
    with pytest.raises(ValueError, match="alpha_rho > alpha_r"):
        theory.rho_star_memory(flat, 1024)
    assert math.isclose(theory.alpha_attn(4), 2.5)
