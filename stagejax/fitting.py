"""Loss scaling laws: the functional forms, Chinchilla's published fit, and a robust fitter.

Owns the loss side of the co-design analysis (design §1: arXiv 2602.10377
predicts loss from a fitted scaling law). Two forms:

  L(N)    = E + A * N^(-alpha)                       (`PowerLawN`)
  L(N, D) = E + A * N^(-alpha) + B * D^(-beta)       (`ChinchillaLaw`)

with N parameters and D training tokens. Fitting follows Hoffmann et al. 2022 ("Training
Compute-Optimal Large Language Models", arXiv 2203.15556, Appendix D.2): minimise the Huber loss
(delta = 1e-3) of the log-space residuals

  r_i = LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i,     E = e^e, A = e^a, B = e^b

with L-BFGS-B started from every point of a grid of initialisations, keeping the best optimum.
The log-sum-exp form keeps E, A, B positive and the problem well scaled across decades of N.

`holdout` leaves points out of the fit; the returned `FitResult` reports the mean absolute
relative error (|predicted - observed| / observed) on the fitted and the held-out points.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
from scipy import optimize

from stagejax_device.results import atomic_write_json


@dataclasses.dataclass(frozen=True)
class PowerLawN:
    """L(N) = E + A * N^(-alpha). `n_tokens` is accepted and ignored, so every loss model
    has the same call signature `model(n_params, n_tokens)`."""

    E: float
    A: float
    alpha: float

    def __call__(self, n_params, n_tokens=None):
        n = np.asarray(n_params, dtype=np.float64)
        return self.E + self.A * n ** (-self.alpha)


@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """L(N, D) = E + A * N^(-alpha) + B * D^(-beta) (Hoffmann et al. 2022, eq. 2)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, n_params, n_tokens):
        if n_tokens is None:
            raise ValueError("ChinchillaLaw needs n_tokens (the training tokens D); "
                             "use PowerLawN for a loss that depends on N only")
        n = np.asarray(n_params, dtype=np.float64)
        d = np.asarray(n_tokens, dtype=np.float64)
        return self.E + self.A * n ** (-self.alpha) + self.B * d ** (-self.beta)


# Hoffmann et al. 2022, approach 3 (eq. 10 with the published, rounded estimates): N counts all
# of the model's parameters, embeddings included (Pearce & Song 2024, arXiv 2406.12907, trace the
# Kaplan/Chinchilla exponent gap to exactly this), D the training tokens; loss in nats per token
# on MassiveText, so absolute values do not transfer to another tokenizer or corpus.
CHINCHILLA = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)

LossModel = PowerLawN | ChinchillaLaw


@dataclasses.dataclass(frozen=True)
class FitResult:
    """A fitted model and its errors: mean |relative error| on the fitted points and on the
    held-out points (None without a holdout). `objective` is the Huber objective reached."""

    model: LossModel
    train_error: float
    holdout_error: float | None
    n_points: int  # points used in the fit
    n_holdout: int = 0
    objective: float = float("nan")


# ---- the objective ----------------------------------------------------------------------------
# Parameter vectors: L(N): (e, a, alpha); L(N, D): (e, a, b, alpha, beta).


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of each residual and its derivative."""
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
    grad = np.where(small, r, delta * np.sign(r))
    return value, grad


def _objective_n(theta, log_n, log_loss, delta):
    e, a, alpha = theta
    terms = np.stack([np.full_like(log_n, e), a - alpha * log_n])  # [2, P]
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    lse = top + np.log(weights.sum(axis=0))
    softmax = weights / weights.sum(axis=0)
    value, dr = _huber(lse - log_loss, delta)
    grad = np.array([np.sum(dr * softmax[0]), np.sum(dr * softmax[1]),
                     np.sum(dr * softmax[1] * -log_n)])
    return value.sum(), grad


def _objective_nd(theta, log_n, log_d, log_loss, delta):
    e, a, b, alpha, beta = theta
    terms = np.stack([np.full_like(log_n, e), a - alpha * log_n, b - beta * log_d])  # [3, P]
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    lse = top + np.log(weights.sum(axis=0))
    softmax = weights / weights.sum(axis=0)
    value, dr = _huber(lse - log_loss, delta)
    grad = np.array([np.sum(dr * softmax[0]), np.sum(dr * softmax[1]), np.sum(dr * softmax[2]),
                     np.sum(dr * softmax[1] * -log_n), np.sum(dr * softmax[2] * -log_d)])
    return value.sum(), grad


# Grids of initialisations. Hoffmann et al. use e in {-1, -.5, ..., 1}, a, b in {0, 5, ..., 25},
# alpha, beta in {0, .5, ..., 2}; these are coarser (fits of a few dozen points must run in
# well under a second) but span the same ranges.
GRID_N = {"e": (-1.0, 0.0, 1.0), "a": (0.0, 2.5, 5.0, 10.0, 20.0), "alpha": (0.1, 0.3, 0.6, 1.0, 2.0)}
GRID_ND = {"e": (-1.0, 0.0, 1.0), "a": (0.0, 5.0, 10.0, 20.0), "b": (0.0, 5.0, 10.0, 20.0),
           "alpha": (0.1, 0.4, 1.0), "beta": (0.1, 0.4, 1.0)}
# Exponents outside this range are not a scaling law; the bound keeps L-BFGS-B from wandering.
EXPONENT_BOUNDS = (0.0, 5.0)
LOG_COEFF_BOUNDS = (-20.0, 60.0)


def _holdout_mask(holdout, n_points: int) -> np.ndarray:
    mask = np.zeros(n_points, dtype=bool)
    if holdout is None:
        return mask
    holdout = np.asarray(holdout)
    if holdout.dtype == bool:
        if holdout.shape != (n_points,):
            raise ValueError(f"holdout mask has shape {holdout.shape}, expected ({n_points},)")
        return holdout.copy()
    if holdout.size and (holdout.min() < -n_points or holdout.max() >= n_points):
        raise ValueError(f"holdout indices must lie in [0, {n_points}), got {holdout.tolist()}")
    mask[holdout.astype(int)] = True
    return mask


def _check_points(name: str, values, n_points: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if n_points is not None and array.size != n_points:
        raise ValueError(f"{name} has {array.size} values, expected {n_points} (one per point)")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ValueError(f"{name} must be finite and positive (the fit works in log space), "
                         f"got {array.tolist()}")
    return array


def _mean_relative_error(model: LossModel, n, d, loss) -> float | None:
    if loss.size == 0:
        return None
    predicted = model(n, d)
    return float(np.mean(np.abs(predicted - loss) / loss))


def _best_of_grid(objective, args, grid: dict, bounds) -> tuple[np.ndarray, float]:
    best_theta, best_value = None, math.inf
    for start in itertools.product(*grid.values()):
        result = optimize.minimize(objective, np.array(start), args=args, jac=True,
                                   method="L-BFGS-B", bounds=bounds)
        if np.isfinite(result.fun) and result.fun < best_value:
            best_theta, best_value = result.x, float(result.fun)
    if best_theta is None:
        raise RuntimeError("no start of the fit reached a finite objective")
    return best_theta, best_value


def fit_loss_n(n, loss, *, delta: float = 1e-3, holdout=None,
               grid: dict | None = None) -> FitResult:
    """Fit L(N) = E + A * N^(-alpha) to (n, loss) points.

    Args:
      n: [P] parameter counts (positive).
      loss: [P] observed losses (positive, nats).
      delta: Huber threshold on log-space residuals (Hoffmann et al.: 1e-3).
      holdout: boolean mask [P] or indices of points left out of the fit and only evaluated.
      grid: initialisations {"e", "a", "alpha"} -> values (default `GRID_N`).
    """
    loss = _check_points("loss", loss)
    n = _check_points("n (parameter counts)", n, loss.size)
    held = _holdout_mask(holdout, loss.size)
    fit = ~held
    if fit.sum() < 3:
        raise ValueError(f"fitting L(N) needs at least 3 points outside the holdout, got {fit.sum()}")
    bounds = [LOG_COEFF_BOUNDS, LOG_COEFF_BOUNDS, EXPONENT_BOUNDS]
    theta, value = _best_of_grid(_objective_n, (np.log(n[fit]), np.log(loss[fit]), delta),
                                 grid or GRID_N, bounds)
    model = PowerLawN(E=float(np.exp(theta[0])), A=float(np.exp(theta[1])), alpha=float(theta[2]))
    return FitResult(model, _mean_relative_error(model, n[fit], None, loss[fit]),
                     _mean_relative_error(model, n[held], None, loss[held]),
                     int(fit.sum()), int(held.sum()), value)


def fit_loss_nd(n, d, loss, *, delta: float = 1e-3, holdout=None,
                grid: dict | None = None) -> FitResult:
    """Fit L(N, D) = E + A * N^(-alpha) + B * D^(-beta) to (n, d, loss) points.

    Args:
      n: [P] parameter counts; d: [P] training tokens; loss: [P] observed losses.
      delta, holdout: as in `fit_loss_n`.
      grid: initialisations {"e", "a", "b", "alpha", "beta"} -> values (default `GRID_ND`).
    """
    loss = _check_points("loss", loss)
    n = _check_points("n (parameter counts)", n, loss.size)
    d = _check_points("d (training tokens)", d, loss.size)
    held = _holdout_mask(holdout, loss.size)
    fit = ~held
    if fit.sum() < 5:
        raise ValueError(f"fitting L(N, D) needs at least 5 points outside the holdout, got {fit.sum()}")
    bounds = [LOG_COEFF_BOUNDS] * 3 + [EXPONENT_BOUNDS] * 2
    theta, value = _best_of_grid(
        _objective_nd, (np.log(n[fit]), np.log(d[fit]), np.log(loss[fit]), delta),
        grid or GRID_ND, bounds)
    model = ChinchillaLaw(E=float(np.exp(theta[0])), A=float(np.exp(theta[1])),
                          B=float(np.exp(theta[2])), alpha=float(theta[3]), beta=float(theta[4]))
    return FitResult(model, _mean_relative_error(model, n[fit], d[fit], loss[fit]),
                     _mean_relative_error(model, n[held], d[held], loss[held]),
                     int(fit.sum()), int(held.sum()), value)


# ---- persistence ------------------------------------------------------------------------------

_KINDS = {"power_law_n": PowerLawN, "chinchilla": ChinchillaLaw}


def save_loss_model(model: LossModel, path: str | Path) -> Path:
    """Write a loss model as JSON (atomically): {"kind": ..., "params": {...}}."""
    kind = next((k for k, cls in _KINDS.items() if type(model) is cls), None)
    if kind is None:
        raise TypeError(f"cannot save a {type(model).__name__}; known loss models: "
                        f"{', '.join(c.__name__ for c in _KINDS.values())}")
    return atomic_write_json(path, {"kind": kind, "params": dataclasses.asdict(model)})


def load_loss_model(path: str | Path) -> LossModel:
    """Read a loss model written by `save_loss_model`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        cls = _KINDS[data["kind"]]
        return cls(**{k: float(v) for k, v in data["params"].items()})
    except FileNotFoundError:
        raise FileNotFoundError(f"no loss model file at {path}") from None
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a loss model written by save_loss_model "
                         f"(expected {{'kind': one of {sorted(_KINDS)}, 'params': {{...}}}}): "
                         f"{error!r}") from None
