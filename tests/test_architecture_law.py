"""The co-design paper's loss law (Eq. 2) and its fitter: recovery of known coefficients from
noisy synthetic points, held-out errors, bootstrap intervals, fixed terms, refusals, JSON.

Synthetic data: 160 architectures drawn from a grid of l, d, r, ρ and d_m, losses from a known
law of the Eq. 2 form times log-normal noise of 0.3%, seeded. The known law has Table 6's
coefficients except the KV term (α_m = 0.5, κ_m = 2): with Table 6's α_m = 0.05, κ_m/d_m^α_m is
almost a constant over any realistic d_m range and is not separable from L_∞ at this noise.
"""

import dataclasses

import numpy as np
import pytest

from stagejax.architecture_law import (PAPER_TABLE6, ArchitectureLaw, ArchitectureLawFit,
                                       fit_architecture_law)

NOISE = 0.003
TRUE = dataclasses.replace(PAPER_TABLE6, alpha_m=0.5, kappa_m=2.0)


def synthetic(n=160, seed=0, law=TRUE, tokens=None):
    rng = np.random.default_rng(seed)
    depth = rng.choice([4, 8, 12, 16, 24, 32], n)
    width = rng.choice([256, 512, 768, 1024, 1536, 2048], n)
    r = rng.choice([0.5, 1.0, 2.0, 4.0], n)
    rho = rng.choice([1.0, 0.5, 0.25, 0.125], n)
    kv_width = width / rng.choice([1, 2, 4, 8], n)
    tokens = np.full(n, 1e10) if tokens is None else tokens
    loss = law(depth, width, r, rho, kv_width, tokens=tokens) * np.exp(rng.normal(0, NOISE, n))
    return {"depth": depth, "width": width, "ffn_ratio": r, "expert_ratio": rho,
            "kv_width": kv_width, "tokens": tokens, "loss": loss, "seed": np.zeros(n)}


def test_table6_preset_evaluates_eq2():
    law = PAPER_TABLE6
    expected = (9.96 / 16 ** 1.63 + 0.031 * 0.125 ** 1.09 / (0.5 ** 0.17 * 2048 ** -0.33)
                + 500 / (0.5 ** 0.17 * 2048 ** 0.97) + 0.2 / 512 ** 0.05 + 2.53)
    assert law(16, 2048, 0.5, 0.125, 512) == pytest.approx(expected)
    assert sum(law.terms(16, 2048, 0.5, 0.125, 512).values()) == pytest.approx(expected)
    assert ArchitectureLaw.from_dict(law.to_dict()) == law


def test_fit_recovers_known_coefficients_from_noisy_points(tmp_path):
    table = synthetic()
    fit = fit_architecture_law(table, holdout=np.arange(130, 160), n_starts=4, n_bootstrap=24)
    law = fit.law
    assert (fit.n_train, fit.n_holdout) == (130, 30)
    # the well-determined exponents and the floor
    assert law.alpha_l == pytest.approx(TRUE.alpha_l, abs=0.05)
    assert law.beta2 == pytest.approx(TRUE.beta2, abs=0.03)
    assert law.alpha_r == pytest.approx(TRUE.alpha_r, abs=0.01)
    assert law.L_inf == pytest.approx(TRUE.L_inf, abs=0.05)
    assert law.kappa_d == pytest.approx(TRUE.kappa_d, rel=0.1)
    # predictions as good as the noise, on fitted and held-out rows
    assert fit.mean_rel_error_train < 2 * NOISE and fit.mean_rel_error_holdout < 2 * NOISE
    assert fit.r2_train > 0.99 and fit.r2_holdout > 0.99
    assert len(fit.residuals) == 160 and {r["split"] for r in fit.residuals} == {"train", "holdout"}
    # the bootstrap intervals bracket the fitted values, and every true value lies within three
    # half-widths of its estimate (the intervals measure the estimates' real spread)
    for name in fit.free:
        low, high = fit.intervals[name]
        assert low <= getattr(law, name) <= high
        assert abs(getattr(law, name) - getattr(TRUE, name)) <= 3 * (high - low) / 2, name
    # JSON round trip
    path = fit.save(tmp_path / "fit.json")
    again = ArchitectureLawFit.load(path)
    assert again.law == fit.law and again.intervals == fit.intervals and again.free == fit.free


def test_fixed_terms_are_held_and_seeds_give_a_noise_floor():
    table = synthetic(n=80, seed=3)
    doubled = {k: np.concatenate([v, v]) for k, v in table.items()}
    doubled["seed"] = np.concatenate([np.zeros(80), np.ones(80)])
    doubled["loss"] = doubled["loss"] * np.exp(np.random.default_rng(9).normal(0, NOISE, 160))
    fixed = {"kappa_m": TRUE.kappa_m, "alpha_m": TRUE.alpha_m}
    fit = fit_architecture_law(doubled, fixed=fixed, n_starts=2, n_bootstrap=0)
    assert fit.law.kappa_m == TRUE.kappa_m and fit.law.alpha_m == TRUE.alpha_m
    assert "kappa_m" not in fit.free and fit.intervals is None
    # each seed's loss carries its own 0.3% noise: the pooled spread across seeds is that noise
    assert fit.seed_noise_loss == pytest.approx(NOISE * np.mean(doubled["loss"]), rel=0.2)


def test_terms_without_variation_are_refused():
    table = synthetic(n=60)
    table["depth"] = np.full(60, 12)
    with pytest.raises(ValueError, match=r"cannot fit kappa_l .*depth \(l\) takes a single value"):
        fit_architecture_law(table, n_bootstrap=0)
    fit = fit_architecture_law(table, fixed={"kappa_l": 9.96, "alpha_l": 1.63}, n_starts=2,
                               n_bootstrap=0)
    assert fit.law.alpha_l == 1.63
    dense = synthetic(n=60)
    dense["expert_ratio"] = np.ones(60)
    with pytest.raises(ValueError, match="cannot fit alpha_rho"):
        fit_architecture_law(dense, n_bootstrap=0)
    budgets = synthetic(n=60, tokens=np.repeat([1e9, 1e10], 30))
    with pytest.raises(ValueError, match="no data term"):
        fit_architecture_law(budgets, n_bootstrap=0)
    with pytest.raises(ValueError, match="cannot fit kappa_D"):
        fit_architecture_law(synthetic(n=60), data_term=True, n_bootstrap=0)
    with pytest.raises(ValueError, match="lacks columns"):
        fit_architecture_law({"depth": [1], "loss": [3.0]})
    with pytest.raises(ValueError, match="more rows than parameters"):
        fit_architecture_law({k: v[:8] for k, v in synthetic().items()}, n_bootstrap=0)
