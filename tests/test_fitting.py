"""Scaling-law fits: recovery of known parameters from noisy synthetic points, holdout errors,
persistence and bad input.

Synthetic data: losses from a known law times log-normal noise of 0.5% (sigma of log loss),
seeded. Tolerances (what "recovered" means here): exponents within 0.03 absolute, E within 3%,
and mean relative errors on fitted and held-out points within 1% (twice the noise).
"""

import numpy as np
import pytest

from stagejax.fitting import (CHINCHILLA, ChinchillaLaw, FitResult, PowerLawN, fit_loss_n,
                              fit_loss_nd, load_loss_model, save_loss_model)

NOISE = 0.005


def noisy(values, seed):
    return values * np.exp(np.random.default_rng(seed).normal(0.0, NOISE, np.shape(values)))


def test_fit_loss_n_recovers_a_known_law_with_holdout():
    true = PowerLawN(E=1.8, A=50.0, alpha=0.3)
    n = np.geomspace(1e5, 1e9, 24)
    loss = noisy(true(n), seed=0)
    result = fit_loss_n(n, loss, holdout=np.arange(20, 24))  # extrapolate to the 4 largest N
    assert isinstance(result, FitResult) and isinstance(result.model, PowerLawN)
    assert abs(result.model.alpha - true.alpha) < 0.03
    assert result.model.E == pytest.approx(true.E, rel=0.03)
    assert (result.n_points, result.n_holdout) == (20, 4)
    assert result.train_error < 2 * NOISE
    assert result.holdout_error is not None and result.holdout_error < 2 * NOISE
    exact = fit_loss_n(n, true(n))  # noise-free: exact to the optimiser's tolerance
    assert exact.model.alpha == pytest.approx(0.3, abs=2e-3) and exact.holdout_error is None


def test_fit_loss_nd_recovers_chinchilla_with_a_mask_holdout():
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e9, 8), np.geomspace(1e8, 1e11, 8)))
    loss = noisy(CHINCHILLA(n, d), seed=1)
    held = n > 5e8  # the largest models are held out
    result = fit_loss_nd(n, d, loss, holdout=held)
    model = result.model
    assert isinstance(model, ChinchillaLaw)
    assert abs(model.alpha - CHINCHILLA.alpha) < 0.03 and abs(model.beta - CHINCHILLA.beta) < 0.03
    assert model.E == pytest.approx(CHINCHILLA.E, rel=0.03)
    assert (result.n_points, result.n_holdout) == (56, 8)
    assert result.train_error < 2 * NOISE and result.holdout_error < 2 * NOISE


def test_loss_models_round_trip_and_evaluate(tmp_path):
    for model in (PowerLawN(1.5, 20.0, 0.25), CHINCHILLA):
        path = save_loss_model(model, tmp_path / f"{type(model).__name__}.json")
        assert load_loss_model(path) == model
    assert CHINCHILLA(1e9, 2e10) == pytest.approx(1.69 + 406.4 / 1e9 ** 0.34 + 410.7 / 2e10 ** 0.28)
    assert PowerLawN(1.0, 2.0, 1.0)(4.0, n_tokens=123) == pytest.approx(1.5)  # D ignored
    with pytest.raises(ValueError, match="ChinchillaLaw needs n_tokens"):
        CHINCHILLA(1e9, None)
    (tmp_path / "bad.json").write_text('{"kind": "cubic", "params": {}}')
    with pytest.raises(ValueError, match="not a loss model written by save_loss_model"):
        load_loss_model(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_loss_model(tmp_path / "missing.json")
    with pytest.raises(TypeError, match="cannot save a dict"):
        save_loss_model({"E": 1}, tmp_path / "x.json")


def test_bad_inputs_are_refused_clearly():
    n = np.array([1e6, 1e7, 1e8, 1e9])
    with pytest.raises(ValueError, match="loss must be finite and positive"):
        fit_loss_n(n, [3.0, 2.5, -1.0, 2.0])
    with pytest.raises(ValueError, match="n \\(parameter counts\\) has 3 values, expected 4"):
        fit_loss_n(n[:3], [3.0, 2.5, 2.2, 2.0])
    with pytest.raises(ValueError, match="at least 3 points outside the holdout"):
        fit_loss_n(n, [3.0, 2.5, 2.2, 2.0], holdout=[0, 1])
    with pytest.raises(ValueError, match="holdout mask has shape"):
        fit_loss_n(n, [3.0, 2.5, 2.2, 2.0], holdout=np.array([True, False]))
    with pytest.raises(ValueError, match="at least 5 points"):
        fit_loss_nd(n, n * 20, [3.0, 2.5, 2.2, 2.0])
