"""The architecture-law sweep: a Latin hypercube over depth, width, FFN ratio, experts and KV
heads, written as hydra configs (one file per run under `conf_train/arch_law/`, the sweep in
`conf_train/experiment/arch_law.yaml`).

Why a Latin hypercube over levels: Eq. 2 of the co-design paper (`../shared/PAPER_NOTES.md`) has
five architectural variables; a full factorial over 4 x 4 x 3 x 4 x 3 levels is 576 runs, far
beyond a 2-core machine, while a Latin hypercube of n runs puts every level of every variable in
the sweep about n / levels times, so each term's variable spans its whole range. The best of
several seeded draws by the smallest distance between two points (maximin) keeps the points
apart. Three configurations (the smallest, the median and the largest by active parameters)
are repeated with two more seeds to measure seed noise; held-out configurations are drawn here,
before any run, and written into the sweep file.

The default (`SCALES["cpu"]`) is sized for this 2-core machine; `SCALES["cluster"]` is a larger
design with more tokens per run for a bigger machine or a SLURM cluster (hydra's submitit
launcher, `hydra/launcher=submitit_slurm` with hydra-submitit-launcher installed).

    python -m stagejax.training.arch_sweep                # write the CPU sweep's files
    python -m stagejax.training.arch_sweep --check        # fail if the files differ
    python -m stagejax.training.arch_sweep --scale cluster --out /path/to/conf_train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from stagejax_device.results import atomic_write_text

CONF_TRAIN = Path(__file__).resolve().parents[2] / "conf_train"
HEAD_DIM = 32  # every width is a whole number of 32-wide heads
GENERATOR = "python -m stagejax.training.arch_sweep"


@dataclasses.dataclass(frozen=True)
class Scale:
    """A sweep's design: the levels of each variable, how many points, tokens per run."""

    name: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    ffn_ratios: tuple[float, ...]  # the paper's r: summed over the active experts
    experts: tuple[tuple[int, int], ...]  # (E, K)
    kv_levels: tuple[str, ...]  # "one" (a single KV head), "half" (n_h / 2), "all" (n_h)
    points: int
    seed_repeats: tuple[int, ...]  # extra seeds of the 3 repeated configurations
    holdout: int  # configurations held out of the fit
    tokens: int  # training tokens per run (Eq. 2 is a law at one token budget)
    seed: int = 0
    draws: int = 200  # Latin hypercube draws; the most spread-out one is kept


SCALES = {
    # 24 configurations + 3 x 2 seed repeats = 30 runs. The token budget and the levels are
    # sized to finish in about 90 minutes on this 2-core machine (see docs/training.md).
    "cpu": Scale(name="cpu", depths=(2, 3, 4, 6), widths=(64, 96, 128, 192),
                 ffn_ratios=(1.0, 2.0, 4.0), experts=((1, 1), (4, 1), (8, 1), (8, 2)),
                 kv_levels=("one", "half", "all"), points=24, seed_repeats=(1, 2), holdout=4,
                 tokens=1_228_800),
    # For a cluster: wider, deeper, 96 configurations at 20M tokens each.
    "cluster": Scale(name="cluster", depths=(2, 4, 6, 8, 12), widths=(128, 192, 256, 384, 512),
                     ffn_ratios=(1.0, 2.0, 3.0, 4.0), experts=((1, 1), (4, 1), (8, 1), (8, 2), (16, 2)),
                     kv_levels=("one", "half", "all"), points=96, seed_repeats=(1, 2), holdout=16,
                     tokens=20_000_000),
}


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    depth: int
    width: int
    ffn_ratio: float
    n_experts: int
    top_k: int
    n_kv_heads: int
    seed: int = 0

    @property
    def n_heads(self) -> int:
        return self.width // HEAD_DIM

    @property
    def architecture(self) -> str:
        """The name of the architecture, e.g. l4_d192_r2_e8k1_kv2 (seeds share it)."""
        return (f"l{self.depth}_d{self.width}_r{self.ffn_ratio:g}_e{self.n_experts}k{self.top_k}"
                f"_kv{self.n_kv_heads}")

    @property
    def name(self) -> str:
        return self.architecture + (f"_s{self.seed}" if self.seed else "")

    def active_params(self) -> float:
        """Active non-embedding parameters (a ranking for picking the repeated configurations)."""
        attention = 2 * self.width * self.width + 2 * self.width * self.n_kv_heads * HEAD_DIM
        return self.depth * (attention + 3 * self.ffn_ratio * self.width ** 2)


def _kv_heads(level: str, n_heads: int) -> int:
    if level == "one":
        return 1
    if level == "half":
        return max(1, n_heads // 2) if n_heads % 2 == 0 else 1
    return n_heads


def _balanced_levels(n: int, levels: int, rng: np.random.Generator) -> np.ndarray:
    """n level indices, each level n // levels times (the remainder drawn), shuffled."""
    base = np.repeat(np.arange(levels), n // levels)
    extra = rng.choice(levels, n - base.size, replace=False)
    return rng.permutation(np.concatenate([base, extra]))


def _spread(design: np.ndarray, sizes: np.ndarray) -> float:
    """The smallest distance between two points of a design, levels scaled to [0, 1]."""
    unit = design / np.maximum(sizes - 1, 1)
    gaps = np.sqrt(((unit[:, None, :] - unit[None, :, :]) ** 2).sum(-1))
    return float(gaps[np.triu_indices(len(design), 1)].min())


def design(scale: Scale) -> list[SweepPoint]:
    """The scale's configurations (seed 0): the most spread-out of `draws` seeded Latin
    hypercubes over the levels, without duplicate architectures."""
    rng = np.random.default_rng(scale.seed)
    sizes = np.array([len(scale.depths), len(scale.widths), len(scale.ffn_ratios),
                      len(scale.experts), len(scale.kv_levels)])
    best, best_spread = None, -1.0
    for _ in range(scale.draws):
        candidate = np.stack([_balanced_levels(scale.points, s, rng) for s in sizes], axis=1)
        points = [_point(scale, row) for row in candidate]
        if len({p.architecture for p in points}) < len(points):
            continue
        spread = _spread(candidate, sizes)
        if spread > best_spread:
            best, best_spread = points, spread
    if best is None:
        raise ValueError(f"no draw of the {scale.name} design without duplicates; add levels or "
                         f"lower points")
    return best


def _point(scale: Scale, row) -> SweepPoint:
    depth, width, ratio, (experts, top_k), kv = (
        scale.depths[row[0]], scale.widths[row[1]], scale.ffn_ratios[row[2]],
        scale.experts[row[3]], scale.kv_levels[row[4]])
    return SweepPoint(depth, width, ratio, experts, top_k, _kv_heads(kv, width // HEAD_DIM))


def sweep(scale: Scale) -> tuple[list[SweepPoint], list[str]]:
    """(every run: the design, then the seed repeats; the held-out architectures)."""
    points = design(scale)
    ranked = sorted(points, key=lambda p: (p.active_params(), p.architecture))
    repeated = [ranked[0], ranked[len(ranked) // 2], ranked[-1]]
    runs = points + [dataclasses.replace(p, seed=s) for p in repeated for s in scale.seed_repeats]
    rng = np.random.default_rng(scale.seed + 1)
    candidates = [p.architecture for p in points if p not in repeated]
    holdout = sorted(rng.choice(candidates, scale.holdout, replace=False).tolist())
    return runs, holdout


def point_yaml(point: SweepPoint) -> str:
    return (f"# @package _global_\n# Generated by `{GENERATOR}`; do not edit.\n"
            f"model:\n  name: {point.name}\n  n_layers: {point.depth}\n  d_model: {point.width}\n"
            f"  n_heads: {point.n_heads}\n  n_kv_heads: {point.n_kv_heads}\n  head_dim: null\n"
            f"  ffn_ratio: {point.ffn_ratio:g}\n  n_experts: {point.n_experts}\n"
            f"  top_k: {point.top_k}\nseed: {point.seed}\n")


def experiment_yaml(scale: Scale, runs: list[SweepPoint], holdout: list[str]) -> str:
    names = ",".join(p.name for p in runs)
    return (
        f"# @package _global_\n"
        f"# The architecture-law sweep ({scale.name}), generated by `{GENERATOR}"
        f"{'' if scale.name == 'cpu' else ' --scale ' + scale.name}`; do not edit.\n"
        f"# {scale.points} configurations, a Latin hypercube (seed {scale.seed}) over depth "
        f"{list(scale.depths)}, width {list(scale.widths)},\n# FFN ratio "
        f"{[float(r) for r in scale.ffn_ratios]}, (experts, per token) "
        f"{[list(e) for e in scale.experts]}, KV heads {list(scale.kv_levels)};\n"
        f"# 3 of them repeated with seeds {list(scale.seed_repeats)}: {len(runs)} runs of "
        f"{scale.tokens:,} tokens each.\n"
        f"# Run: python -m stagejax.training.run -m experiment=arch_law{'' if scale.name == 'cpu' else '_' + scale.name}\n"
        f"# Held out of the fit (chosen before any run): {', '.join(holdout)}\n"
        f"train:\n  tokens: {scale.tokens}\n  log_every: 16\n"
        f"eval:\n  max_tokens: 65536\n"
        f"checkpoint:\n  every: 200\n"
        f"hydra:\n  sweeper:\n    params:\n      +arch_law: {names}\n")


def files(scale: Scale) -> dict[str, str]:
    """{path under conf_train: text} of the scale's sweep."""
    runs, holdout = sweep(scale)
    suffix = "" if scale.name == "cpu" else f"_{scale.name}"
    out = {f"experiment/arch_law{suffix}.yaml": experiment_yaml(scale, runs, holdout),
           f"arch_law/design{suffix}.json": design_json(scale, runs, holdout)}
    for point in runs:
        out[f"arch_law/{point.name}.yaml"] = point_yaml(point)
    return out


def design_json(scale: Scale, runs: list[SweepPoint], holdout: list[str]) -> str:
    """The design as data, for the fit: the scale, every run's variables, the held-out
    architectures."""
    return json.dumps({"generator": GENERATOR, "scale": dataclasses.asdict(scale),
                       "runs": [{"name": p.name, "architecture": p.architecture,
                                 **dataclasses.asdict(p)} for p in runs],
                       "holdout": holdout}, indent=1) + "\n"


def load_design(scale: str = "cpu", conf_dir: Path = CONF_TRAIN) -> dict:
    """The committed design of a scale (`design_json`)."""
    suffix = "" if scale == "cpu" else f"_{scale}"
    return json.loads((conf_dir / f"arch_law/design{suffix}.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--out", type=Path, default=CONF_TRAIN, help="the conf_train directory")
    parser.add_argument("--check", action="store_true",
                        help="compare with the files on disk instead of writing them")
    args = parser.parse_args(argv)
    wanted = files(SCALES[args.scale])
    if args.check:
        stale = [p for p, text in wanted.items()
                 if not (args.out / p).is_file() or (args.out / p).read_text() != text]
        for path in stale:
            print(f"differs from the generator: {args.out / path}", file=sys.stderr)
        return 1 if stale else 0
    for path, text in wanted.items():
        atomic_write_text(args.out / path, text)
    print(f"wrote {len(wanted)} files under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
