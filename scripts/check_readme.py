#!/usr/bin/env python
"""Run every command in the README's fenced code blocks in a smoke form, or say why it is exempt.

    scripts/check_readme.py            # run them (tiny model, 2 new tokens); exit 1 on a failure
    scripts/check_readme.py --list     # each command's smoke form or exemption; runs nothing
    scripts/check_readme.py -k convert # only commands containing "convert"

Each line of a ```bash block is a command (`a && b` is two); each ```python block is one
program. What runs:
  - `python -m stagejax.run ...` (also as `.venv/bin/python`, `stagejax-run`): the command with
    SMOKE_RUN_OVERRIDES appended — the tiny model, 2 new tokens, one perplexity chunk, wandb off,
    a run directory of its own. Later overrides win, so nothing else needs saying.
  - a ```python block: with SMOKE_PYTHON's substitutions (the tiny model, 2 tokens, one chunk).
  - any other command: its row in SMOKE (the README's text -> the command to run instead; a
    `python -m stagejax.run` result is then smoke-formed as above), or in EXEMPT (-> why it is
    not run here).
A README command that needs a row and has none fails the check. So registering a new README
command is adding a row to SMOKE or EXEMPT (keyed by the command as the README writes it,
without its `# comment`); `python -m stagejax.run` commands need none.

The smoke runs share one JAX compilation cache (a temporary directory), so executables that
several commands compile are compiled once; tests/test_readme.py runs this in the default tier.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

SMOKE_RUN_OVERRIDES = ["model=tiny", "decode.max_new_tokens=2", "eval.ppl_chunks=1",
                       "tracking.mode=disabled"]

# README command -> the command run instead (its smoke form).
SMOKE = {
    ".venv/bin/python -m stagejax.run eval.ppl_chunks=20 eval.n_ctx=512":
        "python -m stagejax.run eval.n_ctx=97",  # the tiny model's whole context
    ".venv/bin/python -m stagejax.convert quant=int4_g32":
        # int4 group sizes divide none of the tiny model's prime widths (refused with a clear
        # error, tests/test_quant.py); int8 runs the same conversion path
        "python -m stagejax.convert model=tiny quant=int8 progress=false",
    ".venv/bin/python -m stagejax.cache ls": "python -m stagejax.cache ls",
}

# README command -> why it is not run here.
EXEMPT = {
    "scripts/setup.sh": "installs the environment: CI's own install step runs it",
    "scripts/setup.sh --test": "installs the environment: CI's own install step runs it",
    ".venv/bin/python -m pytest": "the test suite, which runs this check",
    '.venv/bin/python -m stagejax.run decode.chat=true decode.prompt="What is gravity?"':
        "needs a chat template, which the tiny models' byte tokenizer lacks; SmolLM2's template "
        "is checked against transformers in tests/test_tokenizer.py",
    ".venv/bin/python -m stagejax.run -m schedule=atomic,op,layer,model quant=none,int4_g64":
        "a sweep of eight SmolLM2 jobs (minutes); sweeps and their report run on the tiny model "
        "in tests/test_report.py (joblib) and tests/test_harness.py (submitit)",
    ".venv/bin/python -m stagejax.report multirun/<date>/<time>":
        "needs a sweep's directory; tests/test_report.py reports on one",
    ".venv/bin/python scripts/memcap.py --from-start --cap-mb 512 -- schedule=atomic quant=gguf_native cache=disk":
        "needs a writable cgroup memory controller and drops the machine's page cache (root); "
        "tests/test_memory_metrics.py runs --from-start on the tiny model where there is one",
    ".venv/bin/python scripts/memcap.py --from-start --find-min -- schedule=atomic quant=gguf_native cache=disk eval.ppl_chunks=0":
        "bisects with several capped SmolLM2 runs (minutes) and needs a writable cgroup memory "
        "controller; its parts run in tests/test_memory_metrics.py",
    '.venv/bin/python experiments/race_memory.py --rounds 3 --time-limit-s 180 --device "stagejax device atomic Q4_1=outputs/bundles/smollm2-atomic-q4-disk"':
        "a benchmark of ~20 minutes that needs llama-cpp-python (the optional peers extra, which "
        "compiles llama.cpp), a device bundle and a writable cgroup memory controller",
    ".venv/bin/python scripts/memcap.py --budget-mb 4 --margin-mb 16 -- schedule=atomic cache=disk":
        "needs a usable cgroup memory controller; tests/test_harness.py runs this command on the "
        "tiny model where there is one",
    ".venv/bin/python -m stagejax.export quant=gguf_native cache=disk export.out=outputs/bundles/smollm2-q4":
        "compiles SmolLM2's programs with IREE (~1 minute); tests/test_device_runtime.py exports "
        "and runs tiny bundles of every weight format, fixed and budget plans",
    ".venv/bin/stagejax-device outputs/bundles/smollm2-q4 --prompt \"The capital of France is\" --max-new-tokens 32":
        "needs the bundle above; tests/test_device_runtime.py runs the CLI from a fresh virtual "
        "environment without jax",
    ".venv/bin/python experiments/device_parity.py quant=gguf_native cache=disk":
        "a benchmark on SmolLM2 (export, the main job and the runtime, minutes); its parts are "
        "tested on the tiny model in tests/test_device_runtime.py",
    ".venv/bin/python -m stagejax.cache verify NAME":
        "needs a checkpoint's name; tests/test_cache.py verifies and cleans real ones",
    ".venv/bin/python -m stagejax.cache clean NAME":
        "needs a checkpoint's name; tests/test_cache.py verifies and cleans real ones",
}

# ```python blocks: (pattern, replacement), applied in order.
SMOKE_PYTHON = [(r'"smollm2_135m"', '"tiny"'), (r"max_new_tokens=\d+", "max_new_tokens=2"),
                (r"n_chunks=\d+", "n_chunks=1")]

RUN_ENTRY = re.compile(r"^(?:\S*python3?\s+-m\s+stagejax\.run|stagejax-run)(?=\s|$)")
PYTHON = re.compile(r"^(?:\S*/)?python3?(?=\s)")


@dataclasses.dataclass
class Command:
    readme: str  # as the README writes it (without its comment)
    kind: str  # "bash" | "python"
    smoke: str | None = None  # what runs
    exempt: str | None = None  # why nothing runs
    unregistered: bool = False


def readme_commands(text: str) -> list[Command]:
    """Every command of the README's ```bash blocks and every ```python block."""
    commands = []
    for language, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if language == "python":
            commands.append(Command(body.strip(), "python"))
        elif language in ("bash", "sh", "shell", ""):
            for line in body.splitlines():
                line = _strip_comment(line).strip()
                commands += [Command(part.strip(), "bash") for part in line.split("&&") if part.strip()]
    return commands


def _strip_comment(line: str) -> str:
    """The line without a trailing `# comment` (a # inside quotes stays)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def plan(commands: list[Command]) -> list[Command]:
    """Decide each command's smoke form or exemption (in place); returns them."""
    for command in commands:
        if command.kind == "python":
            smoke = command.readme
            for pattern, replacement in SMOKE_PYTHON:
                smoke = re.sub(pattern, replacement, smoke)
            command.smoke = smoke
        elif command.readme in EXEMPT:
            command.exempt = EXEMPT[command.readme]
        elif command.readme in SMOKE:
            command.smoke = SMOKE[command.readme]
        elif RUN_ENTRY.match(command.readme):
            command.smoke = command.readme
        else:
            command.unregistered = True
    return commands


def argv_of(command: Command, run_dir: Path) -> list[str]:
    """The smoke form as an argument list, with this interpreter and a run directory."""
    if command.kind == "python":
        return [sys.executable, "-c", command.smoke]
    words = shlex.split(command.smoke)
    if words[0] == "stagejax-run":
        words = ["python", "-m", "stagejax.run"] + words[1:]
    if PYTHON.match(words[0] + " "):
        words[0] = sys.executable
    if len(words) > 1 and words[1].startswith("scripts/"):
        words[1] = str(REPO / words[1])
    if RUN_ENTRY.match(" ".join(["python"] + words[1:3])):
        where = "hydra.sweep.dir" if "-m" in words[3:4] or "--multirun" in words else "hydra.run.dir"
        words += [o for o in SMOKE_RUN_OVERRIDES if o not in words] + [f"{where}={run_dir}"]
    return words


@dataclasses.dataclass
class Result:
    command: Command
    argv: list[str]
    returncode: int
    seconds: float
    output: str


def run(commands: list[Command], work_dir: Path, jobs: int = 2, timeout_s: float = 600,
        progress: bool = True) -> list[Result]:
    """Run each smoke form (identical ones once) in `work_dir`, sharing a compilation cache:
    the first alone (it fills the cache), then `jobs` at a time."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(work_dir / "jax-cache"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("WANDB_SILENT", "true")
    todo, seen = [], set()
    for i, command in enumerate(c for c in commands if c.smoke is not None):
        key = tuple(argv_of(command, Path("RUN_DIR")))
        if key not in seen:
            seen.add(key)
            todo.append((command, argv_of(command, work_dir / f"run-{i}")))

    def one(command: Command, argv: list[str]) -> Result:
        start = time.perf_counter()
        try:
            done = subprocess.run(argv, cwd=work_dir, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
            returncode, output = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as expired:
            returncode, output = -1, f"timed out after {timeout_s} s: {expired.stderr or ''}"
        result = Result(command, argv, returncode, time.perf_counter() - start, output)
        if progress:
            print(f"{'ok' if returncode == 0 else f'FAILED ({returncode})'} in "
                  f"{result.seconds:.1f} s: {command.readme.splitlines()[0][:100]}", flush=True)
        return result

    if not todo:
        return []
    results = [one(*todo[0])]
    with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
        results += list(pool.map(lambda item: one(*item), todo[1:]))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="show the plan; run nothing")
    parser.add_argument("-k", dest="only", help="only commands containing this text")
    parser.add_argument("--readme", default=str(README))
    parser.add_argument("--jobs", type=int, default=2, help="smoke forms run at a time")
    args = parser.parse_args()
    commands = plan(readme_commands(Path(args.readme).read_text()))
    if args.only:
        commands = [c for c in commands if args.only in c.readme]
    unregistered = [c for c in commands if c.unregistered]
    if args.list:
        for c in commands:
            what = (f"exempt: {c.exempt}" if c.exempt else "UNREGISTERED" if c.unregistered
                    else f"runs: {shlex.join(argv_of(c, Path('RUN_DIR'))[1:])}" if c.kind == "bash"
                    else "runs: the block, smoke-formed")
            print(f"{c.readme.splitlines()[0][:100]}\n    {what}")
        return 1 if unregistered else 0
    for c in unregistered:
        print(f"UNREGISTERED: {c.readme!r}: add it to SMOKE or EXEMPT in {__file__}")
    with tempfile.TemporaryDirectory(prefix="check-readme-") as work:
        results = run(commands, Path(work), args.jobs)
    failed = [r for r in results if r.returncode != 0]
    for r in failed:
        print(f"\nFAILED: {r.command.readme}\n  ran: {shlex.join(r.argv)}\n{r.output[-3000:]}")
    print(f"\n{len(results) - len(failed)} of {len(results)} smoke forms ran; "
          f"{sum(c.exempt is not None for c in commands)} exempt; {len(unregistered)} unregistered")
    return 1 if failed or unregistered else 0


if __name__ == "__main__":
    sys.exit(main())
