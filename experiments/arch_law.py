"""Fit the co-design paper's architecture law (Eq. 2) to this project's own training sweep.

    python experiments/arch_law.py                 # train what is missing, check, fit, compare
    python experiments/arch_law.py --no-train      # check and fit the runs already trained

The sweep is generated (`python -m stagejax.training.arch_sweep`, `conf_train/arch_law/`): a
Latin hypercube over depth l, width d, FFN ratio r, experts (E, K) and KV heads, with three
configurations repeated over seeds and the held-out configurations fixed before any run. Runs
train under `--runs` (one directory per run, by name; a rerun trains only the missing ones).

Then, printed and written to `--out`:
1. **Sanity before fitting.** The seed-noise band (pooled std of the repeated configurations);
   a least-squares regression of loss on log l, log d, log r, log ρ, log d_m giving each
   variable's effect over the sweep's range with its standard error: loss must fall with width
   and with depth by more than 3x the seed noise, and MoE (lower ρ at equal active parameters,
   r being the active FFN ratio) is compared with dense. A sweep that does not show the depth
   and width directions is reported as inconclusive, and its fit is labelled so.
2. **Which terms are fitted.** A variable whose term Table 6 predicts to move the loss by less
   than 3x the seed noise over the sweep's range cannot be measured by this sweep: its
   parameters are fixed at Table 6's values (and said so); the others are fitted.
3. **The fit** (`stagejax.architecture_law.fit_architecture_law`): R² and mean relative error on
   the fitted and the held-out configurations, bootstrap 95% intervals, the parameters beside
   Table 6's with their signs compared.
4. **Fronts**: the fitted law and Table 6 each plugged into the co-design search
   (`stagejax.codesign.search_moe`, Table 5's space, Jetson Orin Nano, FP16, the paper's
   accounting and workload), the fronts' composition compared.
5. Figures: loss against each variable with the fit, predicted against observed, residuals.

Outputs: runs.csv, sanity.json, fit.json, fronts.csv, report.md, loss_vs_variables.png,
predicted_vs_observed.png, residuals.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from stagejax import codesign
from stagejax.architecture_law import (IDENTIFIED_BY, PAPER_TABLE6, SYMBOLS, ArchitectureLaw,
                                       fit_architecture_law)
from stagejax.devices import load_device
from stagejax.moe_accounting import FP16
from stagejax.training import arch_sweep
from stagejax_device.results import atomic_write_json, atomic_write_text, csv_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "arch_law"
RUNS = ROOT / "multirun" / "arch_law"
VARIABLES = ("depth", "width", "ffn_ratio", "expert_ratio", "kv_width")
SYMBOL = {"depth": "l", "width": "d", "ffn_ratio": "r", "expert_ratio": "ρ", "kv_width": "d_m"}
LOSS_KEY = "valid_loss"  # the paper fits validation loss
NOISE_FACTOR = 3.0  # an effect must exceed 3x the seed noise to count (the criterion)
FRONT_DEVICE = "jetson_orin_nano"
FRONT_R_GRID = (0.5, 1.0, 2.0, 4.0)


# ---- runs -----------------------------------------------------------------------------------


def finished_runs(runs_dir: Path, tokens: int) -> dict[str, dict]:
    """{run name: metrics} of every finished training run below `runs_dir` trained on a
    budget of `tokens` (runs of an earlier design with another budget are not this sweep's)."""
    found = {}
    if not runs_dir.exists():
        return found
    for path in sorted(runs_dir.rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        if (LOSS_KEY in metrics and "n_params_active" in metrics
                and metrics.get("tokens_budget") == tokens):
            found[metrics["model"]] = {**metrics, "path": str(path.relative_to(runs_dir))}
    return found


def train_missing(design: dict, runs_dir: Path) -> float:
    """Train the design's runs that have no metrics yet (one hydra multirun); seconds taken."""
    done = finished_runs(runs_dir, design["scale"]["tokens"])
    missing = [r["name"] for r in design["runs"] if r["name"] not in done]
    if not missing:
        return 0.0
    print(f"training {len(missing)} of {len(design['runs'])} runs into {runs_dir}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stagejax.training.run", "-m", "experiment=arch_law",
                    f"+arch_law={','.join(missing)}", f"hydra.sweep.dir={runs_dir}",
                    "hydra.sweep.subdir=${model.name}-D${train.tokens}", "train.progress=false"],
                   cwd=ROOT, check=True)
    return time.perf_counter() - start


def table(design: dict, runs_dir: Path) -> list[dict]:
    """One row per run of the design: its variables (as trained: r from the rounded expert
    width), loss, counts and times."""
    done = finished_runs(runs_dir, design["scale"]["tokens"])
    missing = [r["name"] for r in design["runs"] if r["name"] not in done]
    if missing:
        raise SystemExit(f"{len(missing)} runs of the design have no metrics under {runs_dir}: "
                         f"{', '.join(missing)}; run without --no-train to train them")
    holdout = set(design["holdout"])
    rows = []
    for run in design["runs"]:
        m = done[run["name"]]
        rows.append({
            "name": run["name"], "architecture": run["architecture"], "seed": m["seed"],
            "held_out": run["architecture"] in holdout,
            "depth": m["n_layers"], "width": m["d_model"],
            "ffn_ratio": m["top_k"] * m["ffn_dim"] / m["d_model"],
            "expert_ratio": m["top_k"] / m["n_experts"], "n_experts": m["n_experts"],
            "top_k": m["top_k"], "n_kv_heads": m["n_kv_heads"],
            "kv_width": m["n_kv_heads"] * m["head_dim"], "tokens": m["tokens_seen"],
            "loss": m[LOSS_KEY], "test_loss": m["test_loss"], "train_loss": m["train_loss"],
            "n_params_active": m["n_params_non_embedding_active"],
            "n_params_total": m["n_params_non_embedding"], "train_s": m["train_s"],
            "wall_s": m["wall_s"]})
    return rows


# ---- 1. sanity -------------------------------------------------------------------------------


def seed_noise(rows: list[dict]) -> tuple[float, list[dict]]:
    """Pooled standard deviation of the loss over the repeated configurations, and per group."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(row["architecture"], []).append(row["loss"])
    repeated = {a: v for a, v in groups.items() if len(v) > 1}
    if not repeated:
        raise SystemExit("no configuration was trained with several seeds: seed noise unknown")
    squares = sum(float(np.sum((np.array(v) - np.mean(v)) ** 2)) for v in repeated.values())
    dof = sum(len(v) - 1 for v in repeated.values())
    per_group = [{"architecture": a, "seeds": len(v), "mean": float(np.mean(v)),
                  "std": float(np.std(v, ddof=1)), "range": float(np.ptp(v))}
                 for a, v in repeated.items()]
    return math.sqrt(squares / dof), per_group


def regression(rows: list[dict]) -> dict[str, dict]:
    """Least squares of loss on the log of each variable (and a constant): each variable's
    effect over the sweep's range (coefficient x (log max - log min)) with its standard error."""
    x = np.column_stack([np.ones(len(rows))] + [np.log([r[v] for r in rows]) for v in VARIABLES])
    y = np.array([r["loss"] for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    residual = y - x @ coef
    dof = len(rows) - x.shape[1]
    sigma2 = float(residual @ residual) / dof if dof > 0 else float("nan")
    cov = sigma2 * np.linalg.pinv(x.T @ x)
    effects = {}
    for i, variable in enumerate(VARIABLES, start=1):
        values = [r[variable] for r in rows]
        span = math.log(max(values)) - math.log(min(values))
        effects[variable] = {"low": min(values), "high": max(values),
                             "effect": float(coef[i] * span),
                             "stderr": float(math.sqrt(cov[i, i]) * span),
                             "coefficient": float(coef[i])}
    effects["_fit"] = {"residual_std": math.sqrt(sigma2), "dof": dof}
    return effects


def sanity(rows: list[dict]) -> dict:
    noise, groups = seed_noise(rows)
    effects = regression(rows)
    threshold = NOISE_FACTOR * noise
    checks = []
    for variable, want in (("width", "falls"), ("depth", "falls")):
        e = effects[variable]
        ok = e["effect"] < -threshold and e["effect"] < -2 * e["stderr"]
        checks.append({"check": f"loss falls with {variable} ({SYMBOL[variable]} "
                                f"{e['low']:g} -> {e['high']:g})",
                       "effect": e["effect"], "stderr": e["stderr"], "threshold": -threshold,
                       "passed": ok})
    e = effects["expert_ratio"]  # ρ from min to max: MoE (low ρ) -> dense (ρ = 1) at equal active
    checks.append({"check": f"MoE vs dense at equal active parameters (ρ {e['low']:g} -> 1)",
                   "effect": e["effect"], "stderr": e["stderr"], "threshold": threshold,
                   "passed": abs(e["effect"]) > threshold and abs(e["effect"]) > 2 * e["stderr"],
                   "direction": "MoE better" if e["effect"] > 0 else "dense better"})
    conclusive = all(c["passed"] for c in checks[:2])
    return {"seed_noise": noise, "seed_groups": groups, "effects": effects, "checks": checks,
            "conclusive": conclusive}


# ---- 2-3. the fit ----------------------------------------------------------------------------


def predicted_spreads(rows: list[dict], law: ArchitectureLaw = PAPER_TABLE6) -> dict[str, float]:
    """How much `law` moves the loss over the sweep's range of each variable, the others at
    their medians."""
    median = {v: float(np.median([r[v] for r in rows])) for v in VARIABLES}
    spreads = {}
    for variable in VARIABLES:
        values = sorted({r[variable] for r in rows})
        losses = [law(**{**median, variable: value}) for value in values]
        spreads[variable] = float(max(losses) - min(losses))
    return spreads


def choose_fixed(spreads: dict[str, float], noise: float) -> dict[str, float]:
    """Parameters of variables the sweep cannot measure, fixed at Table 6's values."""
    weak = {v for v, s in spreads.items() if s < NOISE_FACTOR * noise}
    return {p: getattr(PAPER_TABLE6, p) for p, v in IDENTIFIED_BY.items()
            if v in weak and p in PAPER_TABLE6.__dataclass_fields__}


def fit(rows: list[dict], fixed: dict[str, float], n_bootstrap: int = 200):
    columns = {c: np.array([r[c] for r in rows], dtype=float)
               for c in (*VARIABLES, "tokens", "loss", "seed")}
    holdout = np.array([r["held_out"] for r in rows])
    return fit_architecture_law(columns, fixed=fixed, holdout=holdout, n_starts=16,
                                n_bootstrap=n_bootstrap, seed=0)


# ---- 4. fronts -------------------------------------------------------------------------------


def fronts(law: ArchitectureLaw, r_grid=FRONT_R_GRID) -> tuple[list[dict], list[dict]]:
    """The total-latency fronts of Table 6 and `law` over Table 5's space: per-law summary rows
    and the front designs."""
    device = load_device(FRONT_DEVICE)
    space = codesign.table5_space(r_grid)
    counts: dict = {}
    summary, designs = [], []
    for name, current in (("table6", PAPER_TABLE6), ("fitted", law)):
        points = codesign.search_moe(space, device, FP16, accounting="paper", law=current,
                                     memory_budget_bytes=device.ram_bytes, counts=counts)
        front = codesign.moe_front(points, "total")
        summary.append({"law": name, "designs": len(points), "front": len(front),
                        "moe_share": sum(p.arch.is_moe for p in front) / len(front),
                        "median_depth": float(np.median([p.arch.depth for p in front])),
                        "median_width": float(np.median([p.arch.width for p in front])),
                        "median_r": float(np.median([p.arch.ffn_ratio for p in front])),
                        "top1_share": sum(p.arch.top_k == 1 for p in front if p.arch.is_moe)
                        / max(1, sum(p.arch.is_moe for p in front))})
        designs += [{"law": name, **codesign.moe_design_row(p)} for p in front]
    table6 = {d["design"] for d in designs if d["law"] == "table6"}
    fitted = {d["design"] for d in designs if d["law"] == "fitted"}
    for row in summary:
        row["shared_with_other"] = len(table6 & fitted) / row["front"]
    return summary, designs


# ---- 5. figures ------------------------------------------------------------------------------


def figures(rows: list[dict], result, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = np.array([r["predicted"] for r in result.residuals])
    observed = np.array([r["observed"] for r in result.residuals])
    held = np.array([r["split"] == "holdout" for r in result.residuals])
    fig, axes = plt.subplots(1, len(VARIABLES), figsize=(4 * len(VARIABLES), 3.6), sharey=True)
    for ax, variable in zip(axes, VARIABLES):
        x = np.array([r[variable] for r in rows])
        ax.scatter(x[~held], observed[~held], s=18, label="observed (fitted)")
        ax.scatter(x[held], observed[held], s=18, marker="s", label="observed (held out)")
        ax.scatter(x, predicted, s=14, marker="x", color="k", label="fitted law")
        ax.set_xscale("log")
        ax.set_xlabel(f"{variable} ({SYMBOL[variable]})")
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_variables.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.scatter(observed[~held], predicted[~held], label="fitted")
    ax.scatter(observed[held], predicted[held], marker="s", label="held out")
    lo, hi = min(observed.min(), predicted.min()), max(observed.max(), predicted.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xlabel("observed loss")
    ax.set_ylabel("predicted loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "predicted_vs_observed.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.scatter(predicted[~held], (predicted - observed)[~held], label="fitted")
    ax.scatter(predicted[held], (predicted - observed)[held], marker="s", label="held out")
    ax.axhline(0, color="k", lw=1)
    ax.set_xlabel("predicted loss")
    ax.set_ylabel("predicted - observed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "residuals.png", dpi=110)
    plt.close(fig)


# ---- report ----------------------------------------------------------------------------------


def g(value, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def report(design, rows, checks, spreads, fixed, result, front_summary, train_s, r_grid) -> str:
    scale = design["scale"]
    lines = [
        "# Architecture law from this project's sweep",
        "",
        f"{len(rows)} runs ({len({r['architecture'] for r in rows})} configurations, "
        f"{scale['tokens']:,} tokens each, pydocs with the 4,096-token BPE), generated by "
        f"`{design['generator']}`; validation loss. Command: `python experiments/arch_law.py`"
        + (f"; training took {train_s / 60:.1f} min in this invocation." if train_s else
           f"; the runs' own training and evaluation took "
           f"{sum(r['wall_s'] for r in rows) / 60:.1f} min in total."),
        "",
        "## Sanity before fitting",
        "",
        f"Seed noise (pooled std over {len(checks['seed_groups'])} configurations x "
        f"{checks['seed_groups'][0]['seeds']} seeds): **{checks['seed_noise']:.4f} nats**; "
        f"an effect counts above {NOISE_FACTOR:g}x = {NOISE_FACTOR * checks['seed_noise']:.4f}.",
        "",
        "| configuration | seeds | mean loss | std | range |", "|---|---|---|---|---|",
        *[f"| {s['architecture']} | {s['seeds']} | {s['mean']:.4f} | {s['std']:.4f} | {s['range']:.4f} |"
          for s in checks["seed_groups"]],
        "",
        "Effects over the sweep's range (least squares of loss on log l, log d, log r, log ρ, "
        f"log d_m; residual std {checks['effects']['_fit']['residual_std']:.4f}):",
        "",
        "| variable | range | effect on loss | std. error |", "|---|---|---|---|",
        *[f"| {v} ({SYMBOL[v]}) | {e['low']:g} - {e['high']:g} | {e['effect']:+.4f} | {e['stderr']:.4f} |"
          for v, e in checks["effects"].items() if v != "_fit"],
        "",
        "| check | effect | threshold | result |", "|---|---|---|---|",
        *[f"| {c['check']} | {c['effect']:+.4f} ± {c['stderr']:.4f} | {c['threshold']:+.4f} | "
          f"{'pass' if c['passed'] else 'FAIL'}{' (' + c['direction'] + ')' if 'direction' in c else ''} |"
          for c in checks["checks"]],
        "",
        ("**Conclusive**: loss falls with width and with depth beyond the seed noise."
         if checks["conclusive"] else
         "**INCONCLUSIVE**: this sweep does not show loss falling with both width and depth "
         "beyond the seed noise; the fit below is a description of these runs, not a law."),
        "",
        "## Which terms are fitted",
        "",
        "Loss moved by Table 6's law over each variable's range in the sweep (others at their "
        "medians), against 3x the seed noise:",
        "",
        "| variable | Table 6 spread | fitted? |", "|---|---|---|",
        *[f"| {v} ({SYMBOL[v]}) | {s:.4f} | "
          f"{'no: fixed at Table 6' if s < NOISE_FACTOR * checks['seed_noise'] else 'yes'} |"
          for v, s in spreads.items()],
        "",
        ("Fixed at Table 6: " + ", ".join(f"{SYMBOLS[p]} = {v:g}" for p, v in fixed.items())
         if fixed else "No parameter is fixed."),
        "",
        "## The fit",
        "",
        f"R² {g(result.r2_train)} on {result.n_train} fitted runs, {g(result.r2_holdout)} on "
        f"{result.n_holdout} held-out runs ({', '.join(design['holdout'])}); mean relative error "
        f"{100 * result.mean_rel_error_train:.2f}% / "
        f"{100 * result.mean_rel_error_holdout:.2f}%; {result.n_bootstrap} bootstrap refits.",
        "",
        "| parameter | fitted | 95% interval | Table 6 | same sign |", "|---|---|---|---|---|",
    ]
    for name in result.free:
        value, paper = getattr(result.law, name), getattr(PAPER_TABLE6, name)
        interval = ("—" if result.intervals is None else
                    "[{:.3g}, {:.3g}]".format(*result.intervals[name]))
        lines.append(f"| {SYMBOLS[name]} | {value:.4g} | {interval} | {paper:g} | "
                     f"{'yes' if np.sign(value) == np.sign(paper) or paper == 0 else 'NO'} |")
    lines += ["", "## Fronts: the fitted law in the co-design search", "",
              f"Table 5's space x r in {list(r_grid)}, {FRONT_DEVICE}, FP16, the paper's "
              "accounting, total latency (1024 tokens in, 16 out). The fitted law comes from "
              "models of 64-192 wide with a 4,096-token vocabulary: at Table 5's widths "
              "(768-3072) it extrapolates far outside its data.", "",
              "| law | designs | front | MoE share | top-1 share of MoE | median depth | median width | median r | shared designs |",
              "|---|---|---|---|---|---|---|---|---|",
              *[f"| {s['law']} | {s['designs']} | {s['front']} | {s['moe_share']:.2f} | "
                f"{s['top1_share']:.2f} | {s['median_depth']:g} | {s['median_width']:g} | "
                f"{s['median_r']:g} | {s['shared_with_other']:.2f} |" for s in front_summary],
              "", "Figures: loss_vs_variables.png, predicted_vs_observed.png, residuals.png.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=RUNS, help="the sweep's run directory")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-train", action="store_true", help="only check and fit")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits")
    parser.add_argument("--front-r", default=",".join(f"{r:g}" for r in FRONT_R_GRID),
                        help="FFN ratios of the front search's space")
    args = parser.parse_args(argv)
    r_grid = tuple(float(r) for r in args.front_r.split(","))
    design = arch_sweep.load_design()
    train_s = 0.0 if args.no_train else train_missing(design, args.runs)
    start = time.perf_counter()
    rows = table(design, args.runs)
    checks = sanity(rows)
    spreads = predicted_spreads(rows)
    fixed = choose_fixed(spreads, checks["seed_noise"])
    result = fit(rows, fixed, args.bootstrap)
    for row, residual in zip(rows, result.residuals):
        row["predicted"] = residual["predicted"]
    front_summary, front_designs = fronts(result.law, r_grid)
    args.out.mkdir(parents=True, exist_ok=True)
    figures(rows, result, args.out)
    atomic_write_text(args.out / "runs.csv", csv_text(rows))
    atomic_write_json(args.out / "sanity.json", {**checks, "predicted_spreads_table6": spreads,
                                                 "fixed": fixed})
    result.save(args.out / "fit.json")
    atomic_write_text(args.out / "fronts.csv", csv_text(front_designs))
    text = report(design, rows, checks, spreads, fixed, result, front_summary, train_s, r_grid)
    atomic_write_text(args.out / "report.md", text)
    print(text)
    print(f"checks and fit took {time.perf_counter() - start:.1f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
