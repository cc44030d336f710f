"""The staged-generation article's comparison, reproduced: classic vs staged on GPT-2-small shapes.

Source (design §1): Худайберидева Г.Б., Кожухов Д.А., Пименкова А.А., "Разделение задач генерации
текста на этапы для последовательного выполнения на крайне ограниченных ресурсах", Теория и
практика современной науки 8 (122), 2025, https://sciup.org/140312534. The abstract proposes
decomposing the next-token computation into atomic stages «выполняемые строго последовательно»
(run strictly one after another), each using the resources alone, trading time for peak memory.
Its figures, as ../shared/DESIGN.md §1 records them: a GPT-2-small analog at context 512,
classic ~120 MB vs staged 8 MB of RAM, "72 stages (12 layers × 6 operations)", 20 → 2 tokens/s.

For every model (6 and 12 layers, random weights — no GPT-2 weights exist offline, and memory
and speed do not depend on the values) and quantization, runs `model` (classic: every weight
resident, one jit per step) and `atomic` (per-head stages streamed from the stage shards), each
in a fresh process with the settings of `conf/experiment/staged_vs_classic.yaml` (context 512 =
480 prompt tokens + 32 new), then tables the measurements beside the article's claims, with the
arithmetic that checks each claim. Writes `summary.md` and `summary.json` (and one directory per
run) under experiments/results/staged_vs_classic/.

    .venv/bin/python experiments/staged_vs_classic.py                       # the full table
    .venv/bin/python experiments/staged_vs_classic.py --models gpt2_small_6l --new-tokens 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MB = 1e6  # decimal megabytes in this table, like the article's figures (and the 18.9 / 154 MB)
SCHEDULES = ("model", "atomic")
ARTICLE = {"classic_peak_mb": 120, "staged_peak_mb": 8, "stages": 72, "layers_x_ops": (12, 6),
           "classic_tokens_per_s": 20, "staged_tokens_per_s": 2}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def experiment_override(name: str) -> str:
    """`experiment=name` if conf/config.yaml lists an experiment group default, else append it."""
    import yaml

    defaults = yaml.safe_load((CONF / "config.yaml").read_text()).get("defaults", [])
    listed = any(isinstance(d, dict) and any(k.split(" ")[-1] == "experiment" for k in d) for d in defaults)
    return f"{'' if listed else '+'}experiment={name}"


def run_one(model: str, quant: str, schedule: str, new_tokens: int | None, run_dir: Path) -> dict:
    command = [sys.executable, "-m", "stagejax.run", experiment_override("staged_vs_classic"),
               f"model={model}", f"quant={quant}", f"schedule={schedule}", f"hydra.run.dir={run_dir}"]
    if new_tokens is not None:
        command.append(f"decode.max_new_tokens={new_tokens}")
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)}\nfailed (exit {completed.returncode}):\n"
                         f"{completed.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.json").read_text())


def model_facts(name: str, ffn_chunks: int, vocab_chunk: int) -> dict:
    """Sizes that check the article's arithmetic, from the preset's architecture."""
    from stagejax.model_config import PRESETS
    from stagejax.scheduler import group_stages
    from stagejax.stages import ChunkLayout, build_stages

    c = PRESETS[name].config
    d, f, v, n = c.d_model, c.ffn_dim, c.vocab_size, c.n_layers
    per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 2 * 2 * d  # qkv+o (+biases), MLP, 2 LayerNorms
    params = v * d + c.max_seq_len * d + n * per_layer + 2 * d  # tied head; + final LayerNorm
    stages = build_stages(c, ChunkLayout.create(c, ffn_chunks, vocab_chunk))
    return {
        "n_layers": n, "d_model": d, "ffn_dim": f, "vocab_size": v, "params": params, "fp32_weight_bytes": 4 * params, "int8_weight_bytes": params,
        "ffn_layer_fp32_bytes": 2 * d * f * 4, "lm_head_fp32_bytes": v * d * 4,
        "ffn_chunk_fp32_bytes": 2 * d * -(-f // ffn_chunks) * 4, "head_chunk_fp32_bytes": vocab_chunk * d * 4,
        "atomic_stages": len(stages), "op_groups": len(group_stages(stages, "op", c)),
        "six_ops_stages": 6 * n, "chunking": (ffn_chunks, vocab_chunk),
    }


def preset_settings() -> dict:
    import yaml

    return yaml.safe_load((CONF / "experiment" / "staged_vs_classic.yaml").read_text())


def comparison(rows: list[dict], facts: dict) -> tuple[list[str], list[dict]]:
    """The article's claims beside what was measured and computed here, with notes."""
    by = {(r["model"], r["quant"], r["schedule"]): r for r in rows}
    lines, checks = [], []
    # The arithmetic of the notes is the article's model: GPT-2 small, 12 layers (computed from
    # its preset whether or not it was run).
    f = model_facts("gpt2_small", *facts[next(iter(facts))]["chunking"])
    fp32 = [r for r in rows if r["quant"] == "none"]

    def measured(schedule: str, key: str, scale=MB, fmt="{:.1f}") -> str:
        parts = [f"{r['model']}: " + fmt.format(r[key] / scale) for r in fp32 if r["schedule"] == schedule]
        return "; ".join(parts) or "not run"

    checks.append({
        "claim": f"classic peak RAM ~{ARTICLE['classic_peak_mb']} MB",
        "here": f"decode peak above the runtime baseline, MB — {measured('model', 'peak_rss_decode_bytes')}",
        "note": (f"inconsistent with float32: GPT-2 small's {f['params'] / 1e6:.1f} M parameters (12 "
                 f"layers) are "
                 f"{f['fp32_weight_bytes'] / MB:.1f} MB in float32 (one byte each would be "
                 f"{f['int8_weight_bytes'] / MB:.1f} MB: ~120 MB matches 8-bit weights, or a count "
                 "that leaves the weights out)")})
    checks.append({
        "claim": f"staged peak RAM {ARTICLE['staged_peak_mb']} MB",
        "here": f"atomic decode peak above the runtime baseline, MB — {measured('atomic', 'peak_rss_decode_bytes')}",
        "note": (f"only with the FFN and the LM head cut further than one stage per operation: one "
                 f"layer's FFN alone is 2·{f['d_model']}·{f['ffn_dim']}·4 B = {f['ffn_layer_fp32_bytes'] / MB:.1f} "
                 f"MB and the tied LM head {f['vocab_size']}·{f['d_model']}·4 B = "
                 f"{f['lm_head_fp32_bytes'] / MB:.1f} MB in float32; here the FFN "
                 f"runs in chunks of {f['ffn_chunk_fp32_bytes'] / MB:.1f} MB and the head in chunks of "
                 f"{f['head_chunk_fp32_bytes'] / MB:.1f} MB, plus prefetch buffers")})
    layers, ops = ARTICLE["layers_x_ops"]
    counts = "; ".join(f"{m}: {x['n_layers']} layers × 6 = {x['six_ops_stages']}, atomic stages "
                       f"{x['atomic_stages']}, op groups {x['op_groups']}" for m, x in facts.items())
    checks.append({
        "claim": f"{ARTICLE['stages']} stages = {layers} layers × {ops} operations",
        "here": counts,
        "note": (f"{layers} × {ops} = {layers * ops} holds for 12 layers only; a 6-layer analog has "
                 f"6 × 6 = 36. Either count leaves out the embedding, the final norm and the LM head, "
                 "and splits no operation by head or chunk, which the 8 MB figure requires (above)")})
    speeds = []
    for model in facts:
        classic, staged = by.get((model, "none", "model")), by.get((model, "none", "atomic"))
        if classic and staged:
            speeds.append(f"{model}: {classic['decode_tokens_per_s']:.1f} → {staged['decode_tokens_per_s']:.1f} "
                          f"tokens/s ({classic['decode_tokens_per_s'] / staged['decode_tokens_per_s']:.1f}× slower)")
    checks.append({
        "claim": f"{ARTICLE['classic_tokens_per_s']} → {ARTICLE['staged_tokens_per_s']} tokens/s (10× slower)",
        "here": "; ".join(speeds) or "not run",
        "note": "this machine: 2-core VM shared with other jobs, warm page cache; compare the ratios"})
    lines += ["| article's claim | measured / computed here | note |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['here']} | {c['note']} |" for c in checks]
    return lines, checks


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2_small_6l,gpt2_small")
    default_quants = ["none"] + (["int8"] if (CONF / "quant" / "int8.yaml").exists() else [])
    parser.add_argument("--quants", default=",".join(default_quants),
                        help=f"quantization schemes (conf/quant/*.yaml; default {','.join(default_quants)})")
    parser.add_argument("--new-tokens", type=int, help="decode steps (default: the preset's 32)")
    parser.add_argument("--out", default=str(REPO / "experiments" / "results" / "staged_vs_classic"))
    parser.add_argument("--reuse", action="store_true",
                        help="table runs already in --out (their metrics.json) instead of running them again")
    args = parser.parse_args(argv)
    models, quants = args.models.split(","), args.quants.split(",")
    for group, chosen in (("model", models), ("quant", quants)):
        unknown = [c for c in chosen if c not in options(group)]
        if unknown:
            kind = "quantization scheme" if group == "quant" else "model"
            parser.error(f"unknown {kind} {', '.join(map(repr, unknown))}: conf/{group}/ has "
                         f"{', '.join(options(group))} (a new one needs conf/{group}/<name>.yaml; "
                         "see docs/extending.md)")
    if args.new_tokens is not None and args.new_tokens < 1:
        parser.error("--new-tokens must be >= 1")

    from tqdm import tqdm

    from stagejax_device.results import atomic_write_json, atomic_write_text

    out = Path(args.out)
    preset = preset_settings()
    runs = [(m, q, s) for m in models for q in quants for s in SCHEDULES]
    rows = []
    for model, quant, schedule in tqdm(runs, desc="staged vs classic", unit="run"):
        run_dir = out / f"{model}-{quant}-{schedule}"
        if args.reuse and (run_dir / "metrics.json").exists():
            rows.append(json.loads((run_dir / "metrics.json").read_text()))
        else:
            rows.append(run_one(model, quant, schedule, args.new_tokens, run_dir))
    facts = {m: model_facts(m, preset["schedule"]["ffn_chunks"], preset["schedule"]["vocab_chunk"])
             for m in models}

    context = {r["prompt_tokens"] + r["generated_tokens"] for r in rows}
    lines = [
        "# Staged vs classic decoding, GPT-2-small shapes (random weights)",
        "",
        f"Settings: conf/experiment/staged_vs_classic.yaml — context {', '.join(map(str, sorted(context)))} "
        f"tokens (prompt + generated), `atomic` with FFN in {preset['schedule']['ffn_chunks']} chunks, "
        f"LM head in {preset['schedule']['vocab_chunk']}-row chunks, KV on disk in "
        f"{preset['schedule']['kv_block']}-row blocks, prefetch depth {preset['schedule']['prefetch_depth']}; "
        "`model` keeps every weight and the KV in RAM. Each run in a fresh process; warm page cache; "
        "MB = 10^6 bytes. Decode peak = the decode phase's high-water RSS minus the runtime baseline "
        "(design §7).",
        f"Command: {' '.join(['experiments/staged_vs_classic.py'] + (argv if argv is not None else sys.argv[1:]))}",
        "",
        "| model | layers | quant | schedule | stages | groups | weights MB | planned peak MB | "
        "decode peak MB | runtime baseline MB | tokens/s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {facts[r['model']]['n_layers']} | {r['quant']} | {r['schedule']} | "
            f"{r['n_stages']} | {r['n_groups']} | {r['weight_bytes'] / MB:.1f} | "
            f"{r['planned_peak_bytes'] / MB:.1f} | {r['peak_rss_decode_bytes'] / MB:.1f} | "
            f"{r['baseline_rss_bytes'] / MB:.1f} | {r['decode_tokens_per_s']:.2f} |")
    claim_lines, checks = comparison(rows, facts)
    lines += ["", "## Against the article (https://sciup.org/140312534; figures as ../shared/DESIGN.md §1 "
                  "records them)", ""] + claim_lines
    text = "\n".join(lines)
    print(text)
    atomic_write_text(out / "summary.md", text + "\n")
    atomic_write_json(out / "summary.json", {"article": ARTICLE, "facts": facts, "checks": checks,
                                             "runs": rows, "argv": sys.argv[1:] if argv is None else argv})


if __name__ == "__main__":
    main()
