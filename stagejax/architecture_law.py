"""The co-design paper's loss law over the architecture, its published fit, and a fitter.

Owns the loss side of arXiv 2602.10377 ("Hardware Co-Design Scaling Laws via Roofline Modelling
for On-Device LLMs", design §1), beside Chinchilla's L(N, D) in `stagejax.fitting`. The paper
models the validation loss of a model trained on a fixed token budget directly in its
architecture θ = (l, d, r, ρ, d_m) instead of through a parameter count (Eq. 2):

  L(θ) = κ_l / l^α_l                      depth
       + κ_ρ · ρ^α_ρ / (r^α_r · d^β1)     sparsity (ρ = K / E, 1 for a dense model)
       + κ_d / (r^α_r · d^β2)             capacity (r = K · r_single, the active FFN ratio)
       + κ_m / d_m^α_m                    KV width (d_m = n_kv · d_h)
       + L_∞                              irreducible

`PAPER_TABLE6` holds the paper's fitted values (Table 6), as stated. The paper trains every
architecture on the same 10B tokens, so tokens do not appear in Eq. 2; `ArchitectureLaw` has one
optional extension for sweeps over token budgets, a Chinchilla-style data term κ_D / D^α_D
(κ_D = 0: off, as in the paper).

`fit_architecture_law` fits the form by nonlinear least squares (as the paper does, §4 / Eq. 15)
from several starts, with held-out rows, cluster-bootstrap intervals per coefficient (rows of one
architecture resampled together, so seeds of one architecture do not count as independent
evidence), R² and mean relative error on fitted and held-out rows, and per-row residuals.
Parameters can be fixed at given values; a parameter whose variable takes a single value in the
fitted rows cannot be identified and is refused unless fixed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import optimize

from stagejax_device.results import atomic_write_json

# The law's parameters in a fixed order (fit vectors, JSON, tables).
PARAMETERS = ("kappa_l", "alpha_l", "kappa_rho", "alpha_rho", "beta1", "kappa_d", "beta2",
              "alpha_r", "kappa_m", "alpha_m", "L_inf", "kappa_D", "alpha_D")
# Paper symbols, for tables.
SYMBOLS = {"kappa_l": "κ_l", "alpha_l": "α_l", "kappa_rho": "κ_ρ", "alpha_rho": "α_ρ",
           "beta1": "β1", "kappa_d": "κ_d", "beta2": "β2", "alpha_r": "α_r", "kappa_m": "κ_m",
           "alpha_m": "α_m", "L_inf": "L_∞", "kappa_D": "κ_D", "alpha_D": "α_D"}
# The columns a fit reads (paper symbol in the comment).
COLUMNS = ("depth",         # l, layers
           "width",         # d, model width
           "ffn_ratio",     # r = K · r_single, FFN expansion summed over the active experts
           "expert_ratio",  # ρ = K / E (1 for a dense model)
           "kv_width",      # d_m = n_kv · d_h
           "tokens",        # D, training tokens
           "loss",          # validation loss, nats per token
           "seed")          # training seed (rows of one architecture differ only in it)
_VARIABLE_OF = {"depth": "l", "width": "d", "ffn_ratio": "r", "expert_ratio": "ρ",
                "kv_width": "d_m", "tokens": "D"}
# Which column must vary for a parameter to be identified. A term whose variable is constant is
# a constant itself, indistinguishable from L_∞ (κ_l / l^α_l at one l), or its exponent has
# nothing to act on (ρ^α_ρ at one ρ).
IDENTIFIED_BY = {"kappa_l": "depth", "alpha_l": "depth", "alpha_rho": "expert_ratio",
                 "kappa_rho": "width", "beta1": "width", "kappa_d": "width", "beta2": "width",
                 "alpha_r": "ffn_ratio", "kappa_m": "kv_width", "alpha_m": "kv_width",
                 "kappa_D": "tokens", "alpha_D": "tokens"}
_COEFFICIENTS = ("kappa_l", "kappa_rho", "kappa_d", "kappa_m", "kappa_D")  # >= 0: fitted in log
# Search bounds of the fit. Exponents outside these ranges are not a scaling law of this form;
# β1 may be negative (the paper's is -0.33: the sparsity penalty grows with width).
_BOUNDS = {"alpha_l": (0.0, 5.0), "alpha_rho": (0.0, 5.0), "beta1": (-3.0, 3.0),
           "beta2": (-3.0, 3.0), "alpha_r": (-3.0, 3.0), "alpha_m": (0.0, 5.0),
           "alpha_D": (0.0, 3.0), "L_inf": (0.0, 50.0)}
_LOG_COEFF_BOUNDS = (-30.0, 30.0)


@dataclasses.dataclass(frozen=True)
class ArchitectureLaw:
    """L(l, d, r, ρ, d_m[, D]) of the co-design paper's Eq. 2 (see the module docstring).

    Call it with arrays or scalars: `law(depth, width, ffn_ratio, expert_ratio, kv_width,
    tokens=None)`; `tokens` is needed only when the data term is on (kappa_D > 0).
    """

    kappa_l: float
    alpha_l: float
    kappa_rho: float
    alpha_rho: float
    beta1: float
    kappa_d: float
    beta2: float
    alpha_r: float
    kappa_m: float
    alpha_m: float
    L_inf: float
    kappa_D: float = 0.0  # data term, not in the paper (its runs all see 10B tokens)
    alpha_D: float = 0.0

    def __call__(self, depth, width, ffn_ratio, expert_ratio, kv_width, tokens=None):
        l, d, r, rho, d_m = (np.asarray(v, dtype=np.float64)
                             for v in (depth, width, ffn_ratio, expert_ratio, kv_width))
        loss = (self.kappa_l / l ** self.alpha_l
                + self.kappa_rho * rho ** self.alpha_rho / (r ** self.alpha_r * d ** self.beta1)
                + self.kappa_d / (r ** self.alpha_r * d ** self.beta2)
                + self.kappa_m / d_m ** self.alpha_m + self.L_inf)
        if self.kappa_D:
            if tokens is None:
                raise ValueError("this ArchitectureLaw has a data term (kappa_D > 0): pass tokens=")
            loss = loss + self.kappa_D / np.asarray(tokens, dtype=np.float64) ** self.alpha_D
        return float(loss) if np.ndim(loss) == 0 else loss

    def terms(self, depth, width, ffn_ratio, expert_ratio, kv_width) -> dict[str, float]:
        """Each term of Eq. 2 at one architecture (for reading what drives a prediction)."""
        return {"depth": self.kappa_l / depth ** self.alpha_l,
                "sparsity": self.kappa_rho * expert_ratio ** self.alpha_rho
                / (ffn_ratio ** self.alpha_r * width ** self.beta1),
                "capacity": self.kappa_d / (ffn_ratio ** self.alpha_r * width ** self.beta2),
                "kv_width": self.kappa_m / kv_width ** self.alpha_m, "irreducible": self.L_inf}

    def to_dict(self) -> dict:
        return {"kind": "architecture_law", "form": "arXiv 2602.10377 Eq. 2",
                "params": dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ArchitectureLaw":
        if data.get("kind") != "architecture_law":
            raise ValueError(f"not an architecture law (kind {data.get('kind')!r})")
        return cls(**{k: float(v) for k, v in data["params"].items()})


# Table 6 of the paper (its nonlinear least-squares fit over 170 architectures, 10B tokens each),
# as stated there, rounded as printed.
PAPER_TABLE6 = ArchitectureLaw(kappa_l=9.96, alpha_l=1.63, kappa_rho=0.031, alpha_rho=1.09,
                               beta1=-0.33, kappa_d=500.0, beta2=0.97, alpha_r=0.17,
                               kappa_m=0.20, alpha_m=0.05, L_inf=2.53)


# ---- the fitter --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArchitectureLawFit:
    """A fit of `ArchitectureLaw` and its diagnostics. JSON-serialisable via `to_dict`.

    `intervals[name]` is the (2.5%, 97.5%) percentile interval over bootstrap refits (None
    without bootstrap; a fixed parameter's interval is its value twice). R² and mean |relative
    error| are over the fitted rows (`train`) and the held-out rows (`holdout`, None without).
    `residuals` has one entry per input row: predicted − observed, and its split.
    """

    law: ArchitectureLaw
    free: tuple[str, ...]
    fixed: dict[str, float]
    intervals: dict[str, tuple[float, float]] | None
    r2_train: float
    r2_holdout: float | None
    mean_rel_error_train: float
    mean_rel_error_holdout: float | None
    residuals: list[dict]
    n_train: int
    n_holdout: int
    n_starts: int
    n_bootstrap: int
    sum_squares: float
    seed_noise_loss: float | None  # pooled std of loss across seeds of one architecture

    def to_dict(self) -> dict:
        return {"law": self.law.to_dict(), "free": list(self.free), "fixed": dict(self.fixed),
                "intervals_95": ({k: list(v) for k, v in self.intervals.items()}
                                 if self.intervals is not None else None),
                "r2_train": self.r2_train, "r2_holdout": self.r2_holdout,
                "mean_rel_error_train": self.mean_rel_error_train,
                "mean_rel_error_holdout": self.mean_rel_error_holdout,
                "residuals": self.residuals, "n_train": self.n_train,
                "n_holdout": self.n_holdout, "n_starts": self.n_starts,
                "n_bootstrap": self.n_bootstrap, "sum_squares": self.sum_squares,
                "seed_noise_loss": self.seed_noise_loss}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ArchitectureLawFit":
        intervals = data.get("intervals_95")
        return cls(law=ArchitectureLaw.from_dict(data["law"]), free=tuple(data["free"]),
                   fixed={k: float(v) for k, v in data["fixed"].items()},
                   intervals=({k: tuple(v) for k, v in intervals.items()}
                              if intervals is not None else None),
                   r2_train=data["r2_train"], r2_holdout=data["r2_holdout"],
                   mean_rel_error_train=data["mean_rel_error_train"],
                   mean_rel_error_holdout=data["mean_rel_error_holdout"],
                   residuals=list(data["residuals"]), n_train=data["n_train"],
                   n_holdout=data["n_holdout"], n_starts=data["n_starts"],
                   n_bootstrap=data["n_bootstrap"], sum_squares=data["sum_squares"],
                   seed_noise_loss=data["seed_noise_loss"])

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "ArchitectureLawFit":
        return cls.from_dict(json.loads(Path(path).read_text()))


def table_columns(table) -> dict[str, np.ndarray]:
    """The fit's columns (`COLUMNS`) from a table: a mapping of column -> values (a dict, a
    pandas DataFrame) or a sequence of row mappings. Missing `seed` defaults to 0; missing
    `tokens` to 0 (allowed only while the data term is off)."""
    if hasattr(table, "keys") and not isinstance(table, (list, tuple)):
        raw = {k: np.asarray(table[k]) for k in table.keys()}
    else:
        rows = list(table)
        if not rows:
            raise ValueError("the table has no rows")
        raw = {k: np.asarray([row[k] for row in rows]) for k in rows[0].keys()}
    missing = [c for c in COLUMNS if c not in raw and c not in ("seed", "tokens")]
    if missing:
        raise ValueError(f"the table lacks columns {missing}; a fit reads {list(COLUMNS)}")
    n_rows = len(raw["loss"])
    columns = {}
    for name in COLUMNS:
        values = raw.get(name, np.zeros(n_rows))
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.size != n_rows:
            raise ValueError(f"column {name!r} has {values.size} values, expected {n_rows}")
        if name not in ("seed", "tokens") and (not np.all(np.isfinite(values)) or np.any(values <= 0)):
            raise ValueError(f"column {name!r} must be finite and positive, got {values.tolist()}")
        columns[name] = values
    if np.any(columns["expert_ratio"] > 1):
        raise ValueError("expert_ratio (ρ = K / E) must lie in (0, 1]")
    return columns


def _holdout_mask(holdout, n_rows: int) -> np.ndarray:
    mask = np.zeros(n_rows, dtype=bool)
    if holdout is None:
        return mask
    holdout = np.asarray(holdout)
    if holdout.dtype == bool:
        if holdout.shape != (n_rows,):
            raise ValueError(f"holdout mask has shape {holdout.shape}, expected ({n_rows},)")
        return holdout.copy()
    if holdout.size and (holdout.min() < 0 or holdout.max() >= n_rows):
        raise ValueError(f"holdout indices must lie in [0, {n_rows}), got {holdout.tolist()}")
    mask[holdout.astype(int)] = True
    return mask


def _vector_to_law(theta: np.ndarray, free: Sequence[str], fixed: Mapping[str, float]) -> ArchitectureLaw:
    values = dict(fixed)
    for name, value in zip(free, theta):
        values[name] = math.exp(value) if name in _COEFFICIENTS else float(value)
    return ArchitectureLaw(**values)


def _law_to_vector(law: ArchitectureLaw, free: Sequence[str]) -> np.ndarray:
    out = []
    for name in free:
        value = getattr(law, name)
        out.append(math.log(max(value, 1e-12)) if name in _COEFFICIENTS else value)
    return np.array(out)


def _bounds(free: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [_LOG_COEFF_BOUNDS if n in _COEFFICIENTS else _BOUNDS[n] for n in free]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _predict(law: ArchitectureLaw, cols: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    tokens = cols["tokens"][rows] if law.kappa_D else None
    return np.asarray(law(cols["depth"][rows], cols["width"][rows], cols["ffn_ratio"][rows],
                          cols["expert_ratio"][rows], cols["kv_width"][rows], tokens=tokens))


def _fit_once(theta0, free, fixed, cols, rows) -> tuple[np.ndarray, float]:
    observed = cols["loss"][rows]

    def residuals(theta):
        with np.errstate(over="ignore", invalid="ignore"):
            r = _predict(_vector_to_law(theta, free, fixed), cols, rows) - observed
        return np.where(np.isfinite(r), r, 1e6)

    low, high = _bounds(free)
    result = optimize.least_squares(residuals, np.clip(theta0, low + 1e-9, high - 1e-9),
                                    bounds=(low, high), x_scale="jac", method="trf",
                                    ftol=1e-10, xtol=1e-10, gtol=1e-10, max_nfev=1000)
    return result.x, float(np.sum(result.fun ** 2))


def _starts(free, start: ArchitectureLaw, n_starts: int, rng) -> list[np.ndarray]:
    """The given start, then random perturbations of it: coefficients scaled by e^U(-2, 2),
    exponents shifted by U(-0.5, 0.5) and clipped to the bounds."""
    base = _law_to_vector(start, free)
    low, high = _bounds(free)
    starts = [base]
    is_coeff = np.array([n in _COEFFICIENTS for n in free])
    for _ in range(max(0, n_starts - 1)):
        shift = np.where(is_coeff, rng.uniform(-2.0, 2.0, base.size), rng.uniform(-0.5, 0.5, base.size))
        starts.append(np.clip(base + shift, low, high))
    return starts


def _r2(predicted: np.ndarray, observed: np.ndarray) -> float | None:
    if observed.size < 2:
        return None
    total = float(np.sum((observed - observed.mean()) ** 2))
    return 1.0 - float(np.sum((predicted - observed) ** 2)) / total if total > 0 else None


def _seed_noise(cols, rows) -> float | None:
    """Pooled standard deviation of the loss across seeds of one architecture (a floor for
    any fit's residuals), or None when no architecture has two seeds."""
    keys = np.stack([cols[c][rows] for c in COLUMNS[:6]], axis=1)
    groups: dict[tuple, list[float]] = {}
    for key, loss in zip(map(tuple, keys), cols["loss"][rows]):
        groups.setdefault(key, []).append(loss)
    squares, dof = 0.0, 0
    for losses in groups.values():
        if len(losses) > 1:
            squares += float(np.sum((np.array(losses) - np.mean(losses)) ** 2))
            dof += len(losses) - 1
    return math.sqrt(squares / dof) if dof else None


def fit_architecture_law(table, *, fixed: Mapping[str, float] | None = None,
                         data_term: bool = False, holdout=None,
                         start: ArchitectureLaw = PAPER_TABLE6, n_starts: int = 12,
                         n_bootstrap: int = 200, seed: int = 0) -> ArchitectureLawFit:
    """Fit Eq. 2 (optionally with the data term) to a table of trained architectures.

    Args:
      table: rows of (depth l, width d, ffn_ratio r, expert_ratio ρ, kv_width d_m, tokens, loss,
        seed) — a mapping of columns (dict, DataFrame) or a sequence of row mappings (`COLUMNS`).
      fixed: parameters held at given values, e.g. {"alpha_m": 0.05, "kappa_m": 0.2}.
      data_term: fit κ_D / D^α_D too (needs tokens to vary). Off: κ_D = 0 (the paper's form),
        which requires one token budget across the fitted rows.
      holdout: boolean mask or row indices kept out of the fit and only evaluated.
      start: the first start (default: the paper's Table 6); `n_starts` - 1 more are random
        perturbations of it (seeded by `seed`); the lowest sum of squares wins.
      n_bootstrap: refits on architecture-resampled rows for the 95% intervals (0: none).

    Raises ValueError for a free parameter whose variable takes one value in the fitted rows,
    for varying token budgets without the data term, and for fewer rows than free parameters.
    """
    cols = table_columns(table)
    n_rows = cols["loss"].size
    held = _holdout_mask(holdout, n_rows)
    train = np.flatnonzero(~held)
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(PARAMETERS)
    if unknown:
        raise ValueError(f"unknown parameters in fixed: {sorted(unknown)}; known: {list(PARAMETERS)}")
    token_values = np.unique(cols["tokens"][train])
    if not data_term:
        if token_values.size > 1:
            raise ValueError(f"tokens take {token_values.size} values in the fitted rows but the law "
                             "has no data term (Eq. 2 assumes one token budget): pass data_term=True")
        fixed.setdefault("kappa_D", 0.0)
        fixed.setdefault("alpha_D", 0.0)
    elif np.any(cols["tokens"] <= 0):
        raise ValueError("the data term needs positive tokens in every row")
    free = tuple(p for p in PARAMETERS if p not in fixed)
    for name in free:
        column = IDENTIFIED_BY.get(name)
        if column is None:
            continue
        values = np.unique(cols[column][train])
        if values.size < 2:
            raise ValueError(
                f"cannot fit {name} ({SYMBOLS[name]}): {column} ({_VARIABLE_OF[column]}) takes a "
                f"single value ({values[0]:g}) in the fitted rows, so the term is not identified; "
                f"fix it, e.g. fixed={{{name!r}: {getattr(PAPER_TABLE6, name)!r}}}")
    if train.size <= len(free):
        raise ValueError(f"{train.size} fitted rows for {len(free)} free parameters: need more rows "
                         "than parameters")
    rng = np.random.default_rng(seed)
    start_law = dataclasses.replace(start, **{k: v for k, v in fixed.items()})
    if data_term and "kappa_D" in free and start_law.kappa_D == 0:
        start_law = dataclasses.replace(start_law, kappa_D=1e3, alpha_D=0.3)
    best_theta, best_ss = None, math.inf
    starts = _starts(free, start_law, n_starts, rng)
    for theta0 in starts:
        theta, ss = _fit_once(theta0, free, fixed, cols, train)
        if ss < best_ss:
            best_theta, best_ss = theta, ss
    law = _vector_to_law(best_theta, free, fixed)

    intervals = None
    if n_bootstrap:
        keys = np.stack([cols[c] for c in COLUMNS[:6]], axis=1)[train]
        _, cluster = np.unique(keys, axis=0, return_inverse=True)
        cluster = cluster.reshape(-1)
        members = [train[cluster == c] for c in range(cluster.max() + 1)]
        samples = []
        for _ in range(n_bootstrap):
            picked = rng.integers(0, len(members), len(members))
            rows = np.concatenate([members[c] for c in picked])
            theta, _ = _fit_once(best_theta, free, fixed, cols, rows)
            samples.append(_vector_to_law(theta, free, fixed))
        intervals = {}
        for name in PARAMETERS:
            values = np.array([getattr(s, name) for s in samples])
            intervals[name] = (float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))

    everything = np.arange(n_rows)
    predicted = _predict(law, cols, everything)
    observed = cols["loss"]
    relative = np.abs(predicted - observed) / observed
    heldout = np.flatnonzero(held)
    residuals = [{"row": int(i), "predicted": float(predicted[i]), "observed": float(observed[i]),
                  "residual": float(predicted[i] - observed[i]),
                  "split": "holdout" if held[i] else "train"} for i in everything]
    return ArchitectureLawFit(
        law=law, free=free, fixed={k: float(v) for k, v in fixed.items()}, intervals=intervals,
        r2_train=_r2(predicted[train], observed[train]),
        r2_holdout=_r2(predicted[heldout], observed[heldout]) if heldout.size else None,
        mean_rel_error_train=float(relative[train].mean()),
        mean_rel_error_holdout=float(relative[heldout].mean()) if heldout.size else None,
        residuals=residuals, n_train=int(train.size), n_holdout=int(heldout.size),
        n_starts=len(starts), n_bootstrap=n_bootstrap, sum_squares=best_ss,
        seed_noise_loss=_seed_noise(cols, train))
