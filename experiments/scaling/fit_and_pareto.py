"""Fit the loss laws to a training sweep, plot them, and plug the fit into the co-design search.

    python experiments/scaling/fit_and_pareto.py multirun/scaling/<date>/<time>
    python experiments/scaling/fit_and_pareto.py <sweep dir> --holdout-largest 2 --loss valid_loss
    python experiments/scaling/fit_and_pareto.py <sweep dir> --devices this_machine,raspberry_pi_5

1. Collects every run's metrics.json below the given directories (`stagejax.training.sweep`).
2. Fits L(N) (runs at the largest token budget) and L(N, D) (all runs) with
   `stagejax.fitting`, the runs of the `--holdout-largest` largest-N architectures left out of
   both fits and predicted; prints the laws, their fitted and held-out errors and every run's
   prediction.
3. Plots loss vs non-embedding N with the fitted curves (`loss_vs_n.png`, matplotlib Agg).
4. Saves the fitted laws (`loss_n.json`, `loss_nd.json`; `stagejax.fitting.save_loss_model`).
5. Runs the co-design search (`stagejax.codesign`) for two device profiles over a grid of
   Llama-family designs at the scale of the sweep (1-8 layers, width 32-256, the sweep's
   vocabulary, float32 weights), once with the fitted L(N) (at non-embedding N) and once with
   Chinchilla's published L(N, D) (at total N, D = 20 N), and prints, per device, the designs on
   either Pareto front (latency vs loss) with both laws' losses beside each other.

Writes `fit.json`, `fit.md`, `pareto.md`, `pareto.csv`, `loss_vs_n.png`, `loss_n.json`,
`loss_nd.json` into --out (default: experiments/results/scaling/).

Losses are nats per token of the sweep's own tokenizer on its own corpus; Chinchilla's are on
MassiveText with a 32k vocabulary, so only the two fronts' shapes (which designs are optimal),
not their absolute losses, compare.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # MACHINE_NOTES: BLAS threads fight XLA's

import numpy as np

from stagejax import codesign
from stagejax.devices import load_device
from stagejax.fitting import CHINCHILLA, save_loss_model
from stagejax_device.results import atomic_write_json, atomic_write_text, csv_text
from stagejax.training.sweep import SweepFit, collect_runs, fit_sweep

RESULTS = Path(__file__).resolve().parents[1] / "results" / "scaling"
CONSOLE_ROWS = 20  # rows of each device's table printed (the files hold all of them)
# A design grid at the sweep's scale: the fit is only evidence inside the N range it saw.
GRID = dict(depths=(1, 2, 3, 4, 6, 8), widths=(32, 64, 96, 128, 192, 256),
            ffn_ratios=(2.0, 8 / 3, 4.0), kv_heads=(1, 2, 4), weight_bits=(32.0,),
            moe_active_fractions=(1.0,), head_dim=16)


def law_text(model) -> str:
    params = ", ".join(f"{k}={v:.4g}" for k, v in vars(model).items())
    return f"{type(model).__name__}({params})"


def fit_report(fit: SweepFit) -> tuple[str, dict]:
    n_lo, n_hi = (min(r["n_params_non_embedding"] for r in fit.runs),
                  max(r["n_params_non_embedding"] for r in fit.runs))
    lines = [f"{len(fit.runs)} runs, {len({r['model'] for r in fit.runs})} architectures, "
             f"non-embedding N {n_lo:,} .. {n_hi:,}, token budgets "
             f"{sorted({r['tokens_seen'] for r in fit.runs})}; held out (not fitted, predicted): "
             f"{sorted({r['model'] for r, h in zip(fit.runs, fit.held_out) if h}) or 'none'}", ""]

    def describe(name, result):
        held = ("n/a" if result.holdout_error is None
                else f"{100 * result.holdout_error:.2f}% on {result.n_holdout} held-out runs")
        return (f"- {name}: {law_text(result.model)}; mean |relative error| "
                f"{100 * result.train_error:.2f}% on {result.n_points} fitted runs, {held}")

    lines.append(describe(f"L(N) at D = {fit.law_n_tokens:,}", fit.law_n))
    lines.append(describe("L(N, D)", fit.law_nd) if fit.law_nd else
                 "- L(N, D): not fitted (needs two token budgets and 5 runs outside the holdout)")
    rows = fit.predictions()
    lines += ["", "| model | N (non-emb.) | D | loss | L(N) | L(N, D) | held out |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"| {row['model']} | {row['n_params_non_embedding']:,} | "
                     f"{row['tokens_seen']:,} | {row['loss']:.4f} | {fmt(row['law_n'])} | "
                     f"{fmt(row['law_nd'])} | {'yes' if row['held_out'] else ''} |")
    summary = {
        "law_n": {"model": vars(fit.law_n.model), "tokens": fit.law_n_tokens,
                  "train_error": fit.law_n.train_error, "holdout_error": fit.law_n.holdout_error,
                  "n_points": fit.law_n.n_points, "n_holdout": fit.law_n.n_holdout},
        "law_nd": None if fit.law_nd is None else {
            "model": vars(fit.law_nd.model), "train_error": fit.law_nd.train_error,
            "holdout_error": fit.law_nd.holdout_error, "n_points": fit.law_nd.n_points,
            "n_holdout": fit.law_nd.n_holdout},
        "n_range_non_embedding": [n_lo, n_hi], "runs": rows,
    }
    return "\n".join(lines), summary


def plot(fit: SweepFit, path: Path, loss_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["n_params_non_embedding"] for r in fit.runs], dtype=float)
    d = np.array([r["tokens_seen"] for r in fit.runs], dtype=float)
    loss = np.array([r["loss"] for r in fit.runs])
    grid = np.geomspace(n.min() / 2, n.max() * 3, 200)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(set(d))))
    for color, budget in zip(colors, sorted(set(d))):
        at = d == budget
        for held, marker in ((False, "o"), (True, "s")):
            sel = at & (fit.held_out == held)
            if sel.any():
                ax.scatter(n[sel], loss[sel], marker=marker, s=36, edgecolors=[color],
                           facecolors="none" if held else [color],
                           label=f"D = {budget:,.0f}" + (" (held out)" if held else ""))
        if fit.law_nd is not None:
            ax.plot(grid, fit.law_nd.model(grid, budget), "--", color=color, lw=1)
    ax.plot(grid, fit.law_n.model(grid), "-", color="tab:red", lw=1.5,
            label=f"L(N) fit at D = {fit.law_n_tokens:,}: "
                  f"{fit.law_n.model.E:.2f} + {fit.law_n.model.A:.3g} N^-{fit.law_n.model.alpha:.3f}")
    if fit.law_nd is not None:
        ax.plot([], [], "--", color="0.4", label="L(N, D) fit at each D")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel(f"{loss_key} (nats/token)")
    ax.set_title("loss vs N (hollow squares: held out, predicted)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)  # atomic, like stagejax_device.results


def pareto_rows(grid, device, workload, law_n, n_range) -> list[dict]:
    """Designs on either front for `device`, with both laws' losses side by side."""
    fitted = codesign.search(grid, device, workload, loss_model=law_n,
                             loss_params="non_embedding")
    chinchilla = codesign.search(grid, device, workload, loss_model=CHINCHILLA,
                                 loss_params="total")
    on_fit = {id(p.arch) for p in codesign.pareto_front(fitted)}
    on_chinchilla = {id(p.arch) for p in codesign.pareto_front(chinchilla)}
    rows = []
    for f, c in zip(fitted, chinchilla):
        assert f.arch is c.arch
        if id(f.arch) not in on_fit | on_chinchilla:
            continue
        n = f.arch.params_non_embedding
        rows.append({
            "design": f.arch.label(), "n_non_embedding": n, "n_total": f.arch.params_total,
            "latency_ms": round(f.latency_s * 1e3, 3), "memory_mb": round(f.memory_bytes / 1e6, 2),
            "loss_fit": round(f.loss, 4), "front_fit": "*" if id(f.arch) in on_fit else "",
            "loss_chinchilla": round(c.loss, 4),
            "front_chinchilla": "*" if id(f.arch) in on_chinchilla else "",
            "fit_extrapolated": "" if n_range[0] <= n <= n_range[1] else "yes"})
    return sorted(rows, key=lambda r: r["latency_ms"])


def thinned(rows: list[dict], limit: int) -> list[dict]:
    """At most about `limit` rows spread evenly over a latency-sorted table, ends kept."""
    if len(rows) <= limit:
        return rows
    keep = {round(i * (len(rows) - 1) / (limit - 1)) for i in range(limit)}
    return [row for i, row in enumerate(rows) if i in keep]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="sweep directories (searched recursively)")
    parser.add_argument("--loss", default="test_loss", choices=("test_loss", "valid_loss", "train_loss"))
    parser.add_argument("--holdout-largest", type=int, default=1,
                        help="architectures with the largest N held out of the fits (default 1)")
    parser.add_argument("--devices", default="jetson_orin_nano,raspberry_pi_5",
                        help="two device profiles (conf/device/<name>.yaml or YAML paths)")
    # The sweep's models have a 128-token context: 112 tokens in, 16 out fill it.
    parser.add_argument("--prompt", type=int, default=112, help="prompt tokens (prefill)")
    parser.add_argument("--new", type=int, default=16, help="output tokens (decode steps)")
    parser.add_argument("--cache", type=Path, default=None, help="cache dir (this_machine calibration)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    runs = collect_runs(args.runs, args.loss)
    fit = fit_sweep(runs, args.holdout_largest)
    report, summary = fit_report(fit)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    save_loss_model(fit.law_n.model, args.out / "loss_n.json")
    if fit.law_nd is not None:
        save_loss_model(fit.law_nd.model, args.out / "loss_nd.json")
    plot(fit, args.out / "loss_vs_n.png", args.loss)

    vocab = {r["vocab_size"] for r in runs}
    if len(vocab) != 1:
        raise ValueError(f"the runs use different vocabularies {sorted(vocab)}; fit one sweep")
    grid = codesign.architecture_grid(**GRID, vocab=vocab.pop())
    workload = codesign.Workload(prompt_tokens=args.prompt, new_tokens=args.new)
    sections = [f"# Pareto-optimal designs: the sweep's L(N) beside Chinchilla\n\n"
                f"{len(grid)} designs (depth {GRID['depths']}, width {GRID['widths']}, FFN ratio "
                f"2, 8/3, 4, KV heads {GRID['kv_heads']}, head dim {GRID['head_dim']}, vocabulary "
                f"{grid[0].vocab}, float32 weights); batch 1, {args.prompt} tokens in, {args.new} "
                f"out, weights resident. loss_fit: {law_text(fit.law_n.model)} at non-embedding "
                f"N; loss_chinchilla: Chinchilla's published fit at total N, D = 20 N. `*`: on "
                f"that law's Pareto front. fit_extrapolated: N outside the sweep's "
                f"{summary['n_range_non_embedding'][0]:,}..{summary['n_range_non_embedding'][1]:,}."]
    all_rows = []
    for name in [n.strip() for n in args.devices.split(",") if n.strip()]:
        device = load_device(name, args.cache)
        rows = pareto_rows(grid, device, workload, fit.law_n.model,
                           summary["n_range_non_embedding"])
        both = sum(1 for r in rows if r["front_fit"] and r["front_chinchilla"])
        title = (f"## {name}\n\n{sum(1 for r in rows if r['front_fit'])} designs on the fitted "
                 f"law's front, {sum(1 for r in rows if r['front_chinchilla'])} on Chinchilla's, "
                 f"{both} on both.")
        print(f"\n{title} Every {max(1, len(rows) // CONSOLE_ROWS)}th row (all in pareto.md):\n\n"
              f"{codesign.markdown_table(thinned(rows, CONSOLE_ROWS))}")
        sections += [title, "", codesign.markdown_table(rows), ""]
        all_rows += [{"device": name, **r} for r in rows]
    atomic_write_text(args.out / "pareto.md", "\n\n".join(sections) + "\n")
    atomic_write_text(args.out / "pareto.csv", csv_text(all_rows))
    atomic_write_text(args.out / "fit.md", f"# Loss laws fitted to the sweep\n\n{report}\n")
    atomic_write_json(args.out / "fit.json", {**summary, "loss_key": args.loss,
                                              "sweep_dirs": [str(p) for p in args.runs]})
    print(f"\nwrote {args.out}/fit.md, fit.json, loss_vs_n.png, loss_n.json"
          f"{', loss_nd.json' if fit.law_nd else ''}, pareto.md, pareto.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
