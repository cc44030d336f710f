"""Pareto-optimal designs for two device profiles: predicted latency vs predicted loss.

For each device profile, every architecture of `stagejax.codesign.architecture_grid` (depth,
width, FFN ratio, kv heads, weight bits, MoE activation rate) is evaluated with the roofline
(batch 1, a prompt of --prompt tokens, --new output tokens, weights resident) and the loss model
(default: Chinchilla's published fit at N = total parameters, D = 20 N) plus the weight
format's measured cost: ln(perplexity ratio) of that format on SmolLM2-135M
(`stagejax.quant_loss`, from experiments/results/quant_smollm2/summary.json: 4.5 bits = int4_g32,
8 = int8, 16 = float16, the reference, by assumption); bit widths without a measured format are
excluded from the grid (--ignore-quantization: no cost, the old behaviour). The script prints and
writes the Pareto front (minimum latency and loss), the best design within --latency-budget-s
and --memory-budget-mb, and, for every front design, the analytic stage grouping under a RAM
budget of --ram-budget-mb (resident, streamed in units, or infeasible) with its latency.

    python experiments/pareto_designs.py                       # jetson_orin_nano, raspberry_pi_5
    python experiments/pareto_designs.py --devices this_machine,jetson_agx_orin --ram-budget-mb 64
    python experiments/pareto_designs.py --loss-model fitted_loss.json --loss-params non_embedding

Writes experiments/results/pareto/{pareto.md, pareto.csv, pareto.png} (the front; the plot shows every design).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from stagejax import codesign
from stagejax.devices import load_device
from stagejax.fitting import CHINCHILLA, load_loss_model
from stagejax.quant_loss import SMOLLM2_QUANT_SUMMARY, load_quant_loss
from stagejax_device.results import atomic_write_text, csv_text

RESULTS = Path(__file__).resolve().parent / "results" / "pareto"
CONSOLE_ROWS = 16  # rows of each front printed to the console (the files hold all of them)


def thinned(rows: list[dict], limit: int) -> list[dict]:
    """At most `limit` rows spread over the front, always keeping the best design."""
    if len(rows) <= limit:
        return rows
    step = len(rows) / limit
    keep = {int(i * step) for i in range(limit)} | {len(rows) - 1}
    keep |= {i for i, row in enumerate(rows) if row["best"]}
    return [row for i, row in enumerate(rows) if i in keep]


def plot(results: dict, path: Path, latency_budget_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (name, (points, front, best)) in zip(axes[0], results.items()):
        ax.scatter([p.latency_s * 1e3 for p in points], [p.loss for p in points], s=6,
                   color="0.75", label=f"{len(points)} designs")
        ax.plot([p.latency_s * 1e3 for p in front], [p.loss for p in front], "-o", ms=3,
                color="tab:blue", label=f"Pareto front ({len(front)})")
        if best is not None:
            ax.scatter([best.latency_s * 1e3], [best.loss], marker="*", s=220, color="tab:red",
                       zorder=5, label=f"best under budgets: {best.arch.label()}")
        ax.axvline(latency_budget_s * 1e3, color="tab:red", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("predicted latency, ms (prefill + decode, resident)")
        ax.set_ylabel("predicted loss (nats/token)")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)  # atomic, like stagejax_device.results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="jetson_orin_nano,raspberry_pi_5",
                        help="device profiles (conf/device/<name>.yaml or YAML paths), comma-separated")
    parser.add_argument("--prompt", type=int, default=1024, help="prompt tokens (prefill)")
    parser.add_argument("--new", type=int, default=16, help="output tokens (decode steps)")
    parser.add_argument("--latency-budget-s", type=float, default=2.0)
    parser.add_argument("--memory-budget-mb", type=float, default=1024.0)
    parser.add_argument("--ram-budget-mb", type=float, default=256.0,
                        help="RAM budget for the staged-decoding estimate of each front design")
    parser.add_argument("--loss-model", type=Path, default=None,
                        help="a JSON loss model from stagejax.fitting.save_loss_model (default: Chinchilla)")
    parser.add_argument("--loss-params", choices=("total", "non_embedding"), default="total")
    parser.add_argument("--training-tokens", type=float, default=None,
                        help="training tokens D for an L(N, D) model (default: 20 N)")
    parser.add_argument("--cold", action="store_true",
                        help="streamed weights come from storage, not the page cache")
    parser.add_argument("--cache", type=Path, default=None, help="cache dir (this_machine calibration)")
    parser.add_argument("--quant-results", type=Path, default=SMOLLM2_QUANT_SUMMARY,
                        help="quantization benchmark summary.json: perplexity ratio per format")
    parser.add_argument("--ignore-quantization", action="store_true",
                        help="charge no loss for fewer weight bits (fewer bits then always win)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    loss_model = load_loss_model(args.loss_model) if args.loss_model else CHINCHILLA
    workload = codesign.Workload(prompt_tokens=args.prompt, new_tokens=args.new, warm=not args.cold)
    grid = codesign.architecture_grid()
    loss_penalty, quant_text = None, "no cost for the weight format (--ignore-quantization)"
    if not args.ignore_quantization:
        quant = load_quant_loss(args.quant_results)
        bits = sorted({a.weight_bits for a in grid})
        excluded = [b for b in bits if quant.format_for_bits(b) is None]
        grid = [a for a in grid if a.weight_bits not in excluded]
        loss_penalty = lambda arch: quant.loss_offset_for_bits(arch.weight_bits)  # noqa: E731
        quant_text = ("weight format cost ln(PPL ratio on SmolLM2) from " + quant.source + ": "
                      + ", ".join(f"{b:g} bits = {quant.format_for_bits(b)} +{quant.loss_offset_for_bits(b):.4f} nats"
                                  + (" (assumed)" if quant.format_for_bits(b) in quant.assumed else "")
                                  for b in bits if b not in excluded)
                      + (f"; excluded (no measurement): {', '.join(f'{b:g} bits' for b in excluded)}"
                         if excluded else ""))
    memory_budget, ram_budget = args.memory_budget_mb * 1e6, args.ram_budget_mb * 1e6
    header = (f"Workload: batch 1, {args.prompt} tokens in, {args.new} out; {len(grid)} "
              f"architectures (Llama family, vocab {grid[0].vocab}, head dim {grid[0].head_dim}); "
              f"loss model {loss_model} at N = {args.loss_params} parameters, D = "
              f"{'%.3g' % args.training_tokens if args.training_tokens else '20 N'}; {quant_text}; budgets: "
              f"latency {args.latency_budget_s:g} s, memory {args.memory_budget_mb:g} MB; staged "
              f"estimate under a RAM budget of {args.ram_budget_mb:g} MB (prefetch depth 2, "
              f"KV block 512, {'cold storage' if args.cold else 'warm page cache where the device RAM holds the weights'}).")
    print(header)
    sections, front_rows, results = [f"# Pareto-optimal designs\n\n{header}\n"], [], {}
    for name in [n.strip() for n in args.devices.split(",") if n.strip()]:
        device = load_device(name, args.cache)
        start = time.perf_counter()
        points = codesign.search(grid, device, workload, loss_model=loss_model,
                                 training_tokens=args.training_tokens, loss_params=args.loss_params,
                                 ram_budget_bytes=ram_budget, loss_penalty=loss_penalty)
        front = codesign.pareto_front(points)
        best = codesign.best_under(front, args.latency_budget_s, memory_budget)
        best_staged = codesign.best_under(front, args.latency_budget_s, ram_budget, staged=True)
        elapsed = time.perf_counter() - start
        results[name] = (points, front, best)
        rows = [{"device": name, **codesign.design_row(p, best=p is best)} for p in front]
        front_rows += rows
        summary = (f"## {name}\n\n{device.source}\n\n{len(points)} designs evaluated in "
                   f"{elapsed:.1f} s; {len(front)} on the Pareto front. Best within latency "
                   f"{args.latency_budget_s:g} s and memory {args.memory_budget_mb:g} MB: "
                   f"**{best.arch.label() if best else 'none fits'}**"
                   + (f" (loss {best.loss:.3f}, {best.latency_s * 1e3:.1f} ms, "
                      f"{best.memory_bytes / 1e6:.0f} MB; under a {args.ram_budget_mb:g} MB RAM "
                      f"budget: {best.staged.mode}, {best.staged.total_s * 1e3:.1f} ms)" if best else "")
                   + f". Best when decoding staged within {args.ram_budget_mb:g} MB of RAM and the "
                   f"latency budget: **{best_staged.arch.label() if best_staged else 'none fits'}**"
                   + (f" (loss {best_staged.loss:.3f}, {best_staged.staged.mode} in "
                      f"{best_staged.staged.n_units} units, {best_staged.staged.total_s * 1e3:.1f} ms, "
                      f"peak {best_staged.staged.peak_bytes / 1e6:.0f} MB)" if best_staged else "") + ".")
        print()
        print(summary.replace("**", ""))
        print(codesign.markdown_table(thinned([{k: v for k, v in r.items() if k != "device"}
                                               for r in rows], CONSOLE_ROWS)))
        sections += [summary, "", codesign.markdown_table(
            [{k: v for k, v in r.items() if k != "device"} for r in rows]), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "pareto.md", "\n".join(sections) + "\n")
    atomic_write_text(args.out / "pareto.csv", csv_text(front_rows))
    plot(results, args.out / "pareto.png", args.latency_budget_s)
    print(f"\nwrote {args.out}/pareto.md, pareto.csv, pareto.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
