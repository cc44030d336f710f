"""A finished sweep's runs, and the loss laws fitted to them with held-out runs predicted.

`collect_runs` reads every run's `metrics.json` below the given directories (a hydra multirun
directory holds one per job). `fit_sweep` fits, with `stagejax.fitting`:
  - L(N) = E + A N^-alpha over the runs at one token budget D (the largest budget with enough
    runs), N the non-embedding parameter count (Kaplan's convention, which these small models
    need: the embedding is most of the smallest ones' parameters);
  - L(N, D) = E + A N^-alpha + B D^-beta over every run, D the tokens seen;
leaving out the runs of the `holdout_largest` architectures with the largest N: they are not
fitted, only predicted, so the held-out error measures extrapolation in N, the use a co-design
search makes of the law.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from stagejax.fitting import FitResult, fit_loss_n, fit_loss_nd

REQUIRED_KEYS = ("model", "n_params_non_embedding", "n_params_total", "tokens_seen")


def collect_runs(directories: Iterable[str | Path], loss_key: str = "test_loss") -> list[dict]:
    """The metrics of every finished run below `directories`, sorted by (N, D).

    Raises ValueError naming the file if a metrics.json lacks a key the fit needs, or if two
    runs have the same architecture and token budget (two sweeps mixed up).
    """
    runs, seen = [], {}
    for directory in directories:
        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"no sweep directory {directory}")
        for path in sorted(directory.rglob("metrics.json")):
            metrics = json.loads(path.read_text())
            if "n_params_non_embedding" not in metrics:
                continue  # another experiment's metrics (e.g. a decoding run)
            missing = [k for k in (*REQUIRED_KEYS, loss_key) if k not in metrics]
            if missing:
                raise ValueError(f"{path} lacks {', '.join(missing)}: not a finished training run")
            key = (metrics["model"], metrics["tokens_seen"], metrics.get("seed"))
            if key in seen:
                raise ValueError(f"{path} and {seen[key]} are the same run (model {key[0]}, "
                                 f"D {key[1]}, seed {key[2]}); pass one sweep's directories")
            seen[key] = path
            runs.append({**metrics, "path": str(path), "loss": float(metrics[loss_key])})
    if not runs:
        raise ValueError(f"no training metrics.json below {', '.join(map(str, directories))}")
    return sorted(runs, key=lambda r: (r["n_params_non_embedding"], r["tokens_seen"]))


@dataclasses.dataclass
class SweepFit:
    runs: list[dict]
    held_out: np.ndarray  # bool per run
    law_n: FitResult
    law_n_tokens: int  # the token budget of the runs L(N) was fitted on
    law_n_runs: np.ndarray  # bool per run: at that budget
    law_nd: FitResult | None  # None with a single token budget

    def predictions(self) -> list[dict]:
        """Per run: observed loss, the two laws' predictions, whether it was held out."""
        rows = []
        for run, held, at_budget in zip(self.runs, self.held_out, self.law_n_runs):
            n, d = run["n_params_non_embedding"], run["tokens_seen"]
            rows.append({
                "model": run["model"], "n_params_non_embedding": n, "tokens_seen": d,
                "loss": run["loss"], "held_out": bool(held),
                "law_n": float(self.law_n.model(n)) if at_budget else None,
                "law_nd": float(self.law_nd.model(n, d)) if self.law_nd else None})
        return rows


def fit_sweep(runs: list[dict], holdout_largest: int = 1, delta: float = 1e-3) -> SweepFit:
    """Fit L(N) and L(N, D) to a sweep's runs, the `holdout_largest` largest-N architectures
    held out (see the module docstring)."""
    n = np.array([r["n_params_non_embedding"] for r in runs], dtype=np.float64)
    d = np.array([r["tokens_seen"] for r in runs], dtype=np.float64)
    loss = np.array([r["loss"] for r in runs], dtype=np.float64)
    sizes = sorted(set(n.tolist()))
    if holdout_largest < 0 or holdout_largest >= len(sizes):
        raise ValueError(f"holdout_largest must be in [0, {len(sizes) - 1}] for a sweep of "
                         f"{len(sizes)} architectures, got {holdout_largest}")
    held = n >= sizes[-holdout_largest] if holdout_largest else np.zeros(len(runs), bool)
    # L(N) at the largest budget with at least 3 fitted points (fit_loss_n's minimum).
    budgets = sorted(set(d.tolist()), reverse=True)
    budget = next((b for b in budgets if np.sum((d == b) & ~held) >= 3), None)
    if budget is None:
        raise ValueError("no token budget has 3 runs outside the holdout: L(N) needs at least "
                         "3 architectures trained on the same D")
    at_budget = d == budget
    law_n = fit_loss_n(n[at_budget], loss[at_budget], delta=delta, holdout=held[at_budget])
    law_nd = None
    if len(budgets) > 1 and np.sum(~held) >= 5:
        law_nd = fit_loss_nd(n, d, loss, delta=delta, holdout=held)
    return SweepFit(runs, held, law_n, int(budget), at_budget, law_nd)
