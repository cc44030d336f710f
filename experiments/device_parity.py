#!/usr/bin/env python
"""The device runtime against the JAX path on the same plan, each in a fresh process: export the
plan, decode the same prompt greedily with `python -m stagejax.run` and with `stagejax-device`,
and compare the token ids, the whole process's memory and the speed.

    python experiments/device_parity.py                                  # SmolLM2, atomic, float32
    python experiments/device_parity.py quant=gguf_native cache=disk      # any main-job overrides

Writes experiments/results/device_parity/<name>.json (both runs' metrics, without machine paths)
and appends a row to experiments/results/device_parity/summary.md. Exit status 1 if the ids differ.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stagejax_device.results import atomic_write_json, atomic_write_text  # noqa: E402

KEEP = ("decode_tokens_per_s", "decode_peak_rss_bytes", "baseline_rss_bytes", "decode_working_set_bytes",
        "peak_rss_bytes", "exec_to_first_token_s", "planned_peak_bytes", "n_groups", "n_executables",
        "generated_ids", "generated_text", "rss_breakdown_bytes", "bytes_streamed_per_token",
        "io_wait_frac", "schedule", "quant", "cache", "model")


def run(command: list[str], log: Path) -> None:
    print("parity: $ " + shlex.join(command), flush=True)
    with open(log, "w") as handle:
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"parity: failed (exit {code}); see {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "device_parity")
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "device_parity")
    args, overrides = parser.parse_known_args(argv)
    name = "-".join(["smollm2"] + [o.replace("=", "_").replace(".", "_") for o in overrides]) if overrides else "smollm2-default"
    work = args.out / name
    work.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    bundle = work / "bundle"
    decode = [f"decode.prompt={args.prompt!r}", f"decode.max_new_tokens={args.new_tokens}"]
    run([python, "-m", "stagejax.export", *overrides, *decode, f"export.out={bundle}",
         f"hydra.run.dir={work / 'export'}"], work / "export.log")
    run([python, "-m", "stagejax.run", *overrides, *decode, "eval.ppl_chunks=0", "tracking.mode=disabled",
         "tracking.artifacts=false", f"hydra.run.dir={work / 'jax'}"], work / "jax.log")
    device = Path(python).with_name("stagejax-device")
    run([str(device), str(bundle), "--prompt", args.prompt, "--max-new-tokens", str(args.new_tokens),
         "--out", str(work / "device")], work / "device.log")
    jax_metrics = json.loads((work / "jax" / "metrics.json").read_text())
    device_metrics = json.loads((work / "device" / "metrics.json").read_text())
    same = jax_metrics["generated_ids"] == device_metrics["generated_ids"]
    record = {"overrides": overrides, "prompt": args.prompt, "new_tokens": args.new_tokens,
              "same_greedy_ids": same, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "jax": {k: jax_metrics.get(k) for k in KEEP}, "device": {k: device_metrics.get(k) for k in KEEP}}
    atomic_write_json(args.results / f"{name}.json", record)
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    row = (f"| {' '.join(overrides) or '(defaults)'} | {'yes' if same else 'NO'} | "
           f"{mib(jax_metrics['decode_peak_rss_bytes'])} | {mib(device_metrics['decode_peak_rss_bytes'])} | "
           f"{jax_metrics['decode_tokens_per_s']:.2f} | {device_metrics['decode_tokens_per_s']:.2f} | "
           f"{record['date']} |")
    summary = args.results / "summary.md"
    header = ("# Device runtime vs the JAX path (same plan, fresh processes)\n\n"
              "`python experiments/device_parity.py [overrides]`: greedy decode of the same prompt; "
              "decode peak = the whole process's high-water RSS while decoding, MiB (2^20 bytes); one "
              "run each, warm page cache.\n\n"
              "| overrides | same greedy ids | JAX decode peak MiB | device decode peak MiB | JAX tok/s | "
              "device tok/s | run |\n|---|---|---:|---:|---:|---:|---|\n")
    previous = summary.read_text() if summary.exists() else header
    atomic_write_text(summary, previous + row + "\n")
    print(f"parity: same greedy ids: {same}; decode peak JAX {mib(jax_metrics['decode_peak_rss_bytes'])} MiB, "
          f"device {mib(device_metrics['decode_peak_rss_bytes'])} MiB; tok/s JAX "
          f"{jax_metrics['decode_tokens_per_s']:.2f}, device {device_metrics['decode_tokens_per_s']:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
