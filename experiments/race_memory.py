#!/usr/bin/env python
"""The equal-memory race: stagejax configurations (the JAX path and the device runtime's
bundles) and llama.cpp decode the same prompt under the same whole-process memory caps.

    python experiments/race_memory.py                       # defaults below, 3 rounds
    python experiments/race_memory.py --caps 512,256 --rounds 1 \\
        --stagejax "atomic-q4=schedule=atomic quant=gguf_native cache=disk" --no-llama-cpp
    python experiments/race_memory.py --device "device atomic Q4_1=outputs/bundles/smollm2-q4"
    python experiments/race_memory.py --reuse               # re-table the runs in --out

Every run is a fresh process started inside a cgroup capped from exec
(`stagejax.memcap.run_from_start`), after the machine's page cache was dropped, so the cap
covers interpreter, libraries, compilation, weights, KV and every file page the run reads —
what a device with that much RAM would have. Each contestant decodes `--prompt` greedily for
`--new-tokens` tokens. Rounds are interleaved (every cap and contestant once, then again) and
the table gives medians over rounds. Within a round, a contestant that did not complete under
a cap is not run under smaller ones (recorded as skipped): a run that cannot fit N MB is taken
not to fit less.

Columns: cap, contestant, weight format, decode tokens/s, seconds from exec to the first
token, outcome (completed / killed, and in which phase / over the time limit), the cgroup's
peak (page cache charged to it included), and the perplexity of the contestant's weights
(llama.cpp procedure on wiki.test.raw as bytes, `--ppl-chunks` chunks of 512), measured once
uncapped: stagejax with `schedule=model` and the contestant's quantization (staged and
monolithic perplexity are equal, tests/test_staged.py), llama.cpp through llama-cpp-python.

Writes into `--results` (committed): summary.md, summary.csv, runs.json and race.png (tok/s
vs cap, log axes, one line per contestant); raw run directories go to `--out`.
llama.cpp needs the optional `peers` extra (llama-cpp-python, compiles ~10 minutes).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stagejax.memcap import COMPLETED, CgroupUnavailable, find_memory_cgroup, run_from_start  # noqa: E402
from stagejax_device.results import atomic_write_json, atomic_write_text, csv_text  # noqa: E402

MIB = 2**20
DEFAULT_CAPS_MIB = (512, 256, 150, 110, 90, 64)
DEFAULT_STAGEJAX = (
    "stagejax atomic Q4_1=schedule=atomic quant=gguf_native cache=disk",
    "stagejax model Q4_1=schedule=model quant=gguf_native",
)
LLAMA_CPP = "llama.cpp Q4_1"
WEIGHT_FORMATS = {"none": "float32 (dequantized Q4_1)", "gguf_native": "Q4_1 blocks",
                  "int8": "int8 (from float32)", "int4_g32": "int4 g32", "int4_g64": "int4 g64",
                  "int4_g32_asym": "int4 g32 asym"}


@dataclasses.dataclass
class Contestant:
    name: str
    kind: str  # "stagejax" | "device" | "llama.cpp"
    overrides: list[str]  # stagejax: hydra overrides; device: the bundle, then runtime options

    @property
    def weight_format(self) -> str:
        if self.kind == "llama.cpp":
            return "Q4_1 (GGUF, mmap)"
        if self.kind == "device":
            quant = json.loads((REPO / self.overrides[0] / "plan.json").read_text())["quant"]
        else:
            quant = next((o.split("=", 1)[1] for o in self.overrides if o.startswith("quant=")), "none")
        return WEIGHT_FORMATS.get(quant, quant)

    def command(self, python: str, run_dir: Path, prompt: str, new_tokens: int) -> list[str]:
        if self.kind == "llama.cpp":
            return [python, str(REPO / "experiments" / "peers" / "llama_cpp_run.py"), "--out", str(run_dir),
                    "--prompt", prompt, "--max-new-tokens", str(new_tokens)]
        if self.kind == "device":
            return [str(Path(python).with_name("stagejax-device")), *self.overrides, "--prompt", prompt,
                    "--max-new-tokens", str(new_tokens), "--out", str(run_dir)]
        return [python, "-m", "stagejax.run", *self.overrides, f"decode.prompt={prompt!r}",
                f"decode.max_new_tokens={new_tokens}", "decode.temperature=0", "eval.ppl_chunks=0",
                "tracking.mode=disabled", "tracking.artifacts=false", f"hydra.run.dir={run_dir}"]

    def ppl_command(self, python: str, run_dir: Path, chunks: int) -> list[str]:
        if self.kind == "llama.cpp":
            return [python, str(REPO / "experiments" / "peers" / "llama_cpp_run.py"), "--out", str(run_dir),
                    "--ppl-chunks", str(chunks)]
        if self.kind == "device":
            from stagejax.data import default_data_dir

            return [str(Path(python).with_name("stagejax-device")), *self.overrides, "--ppl-chunks", str(chunks),
                    "--text", str(default_data_dir() / "wikitext-2" / "wiki.test.raw"), "--out", str(run_dir)]
        keep = [o for o in self.overrides if o.split("=", 1)[0] in ("quant", "model", "model.path")]
        return [python, "-m", "stagejax.run", *keep, "schedule=model", "decode.max_new_tokens=1",
                f"eval.ppl_chunks={chunks}", "eval.n_ctx=512", "tracking.mode=disabled",
                "tracking.artifacts=false", f"hydra.run.dir={run_dir}"]


def parse_contestant(spec: str, kind: str) -> Contestant:
    name, sep, arguments = spec.partition("=")
    if not sep or not arguments.strip():
        what = "override override ..." if kind == "stagejax" else "BUNDLE [runtime options]"
        raise SystemExit(f"--{kind} {spec!r}: write it as 'NAME={what}'")
    arguments = shlex.split(arguments)
    if kind == "device":
        bundle = Path(arguments[0]).resolve()
        if not (bundle / "plan.json").is_file():
            raise SystemExit(f"--device {spec!r}: {arguments[0]} is not a bundle (python -m stagejax.export)")
        # runs start in the repository: a bundle inside it is named relative to it (no machine paths)
        arguments[0] = str(bundle.relative_to(REPO)) if bundle.is_relative_to(REPO) else str(bundle)
    return Contestant(name.strip(), kind, arguments)


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def run_once(contestant: Contestant, cap_mib: int, round_index: int, args) -> dict:
    run_dir = args.out / "runs" / f"r{round_index}" / f"{cap_mib}MiB" / slug(contestant.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    command = contestant.command(args.python, run_dir, args.prompt, args.new_tokens)
    with open(run_dir / "run.log", "w") as log:
        outcome = run_from_start(command, cap_mib * MIB, time_limit_s=args.time_limit_s, run_dir=run_dir,
                                 cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    record = {"round": round_index, "cap_mib": cap_mib, "contestant": contestant.name,
              "status": outcome.status, "phase": outcome.phase, "returncode": outcome.returncode,
              "wall_s": round(outcome.wall_s, 2), "cgroup_peak_bytes": outcome.cgroup_peak_bytes,
              "oom_kills": outcome.oom_kills, "page_cache_dropped": outcome.page_cache["page_cache_dropped"],
              "other_processes_mapping": outcome.other_processes_mapping}
    metrics_file = run_dir / "metrics.json"
    if outcome.completed and metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        record.update({k: metrics.get(k) for k in (
            "decode_tokens_per_s", "exec_to_first_token_s", "decode_peak_rss_bytes", "peak_rss_bytes",
            "generated_tokens", "n_decode_steps", "generated_text")})
    print(f"race: round {round_index} cap {cap_mib} MiB {contestant.name}: {outcome.status}"
          + (f" ({record.get('decode_tokens_per_s') or 0:.2f} tok/s)" if outcome.completed
             else f" in phase {outcome.phase or 'startup'}") + f", {outcome.wall_s:.0f} s", flush=True)
    return record


def measure_ppl(contestant: Contestant, args) -> dict:
    run_dir = args.out / "ppl" / slug(contestant.name)
    command = contestant.ppl_command(args.python, run_dir, args.ppl_chunks)
    print(f"race: perplexity of {contestant.name}'s weights: $ {shlex.join(command)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "run.log", "w") as log:
        code = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        return {"ppl": None, "ppl_note": f"failed (exit {code}, see {run_dir}/run.log)"}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"ppl": metrics["ppl"], "ppl_stderr": metrics["ppl_stderr"], "ppl_chunks": metrics["ppl_chunks"],
            "ppl_command": display(command, args.python, run_dir)}


def display(command: list[str], python: str, run_dir: Path) -> str:
    """A command as a reader would type it: no machine paths, no output directory."""
    shown, skip = [], False
    for part in command:
        if skip or part.startswith("hydra.run.dir="):
            skip = False
            continue
        if part == "--out":
            skip = True
            continue
        part = "python" if part == python else part.replace(str(REPO) + "/", "")
        part = part.replace(str(REPO.parent / "shared") + "/", "../shared/")  # the data beside the repo
        shown.append(part)
    return shlex.join(shown)


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(records: list[dict], contestants: list[Contestant], ppl: dict, caps: list[int]) -> list[dict]:
    rows = []
    for cap in caps:
        for c in contestants:
            mine = [r for r in records if r["cap_mib"] == cap and r["contestant"] == c.name]
            if not mine:
                continue
            done = [r for r in mine if r["status"] == COMPLETED]
            outcomes = ", ".join(sorted({_outcome(r) for r in mine}))
            rows.append({
                "cap_mib": cap, "contestant": c.name, "weight_format": c.weight_format,
                "completed": f"{len(done)}/{len(mine)}",
                "decode_tokens_per_s": median([r.get("decode_tokens_per_s") for r in done]),
                "tokens_per_s_rounds": [r.get("decode_tokens_per_s") for r in done],
                "exec_to_first_token_s": median([r.get("exec_to_first_token_s") for r in done]),
                "outcome": outcomes,
                "cgroup_peak_mib": _mib(median([r.get("cgroup_peak_bytes") for r in mine])),
                "decode_peak_rss_mib": _mib(median([r.get("decode_peak_rss_bytes") for r in done])),
                "ppl": ppl.get(c.name, {}).get("ppl"), "ppl_stderr": ppl.get(c.name, {}).get("ppl_stderr"),
            })
    return rows


def _outcome(record: dict) -> str:
    if record["status"] == COMPLETED:
        return "completed"
    if record["status"] == "skipped":
        return f"skipped ({record['phase']})"
    return f"{record['status']} in {record['phase'] or 'startup'}"


def _mib(value):
    return None if value is None else value / MIB


def _fmt(value, spec):
    return "—" if value is None else format(value, spec)


def quiet_machine(meta: dict) -> str:
    """Whether other processes held the contestants' libraries mapped (pages a cap then misses)."""
    shared = meta.get("runs_with_other_processes_mapping")
    if shared is None:
        return "Other processes mapping the contestants' libraries: not recorded."
    if shared == 0:
        return ("No other process had the contestants' libraries mapped during any run (so every "
                "page the runs used was charged to their own cgroup).")
    return (f"In {shared} of {meta['n_runs']} runs another process had the contestants' libraries "
            "mapped: those pages were not charged to the run's cgroup (`runs.json`, "
            "`other_processes_mapping`).")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# The equal-memory race",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Run {meta['started']} – {meta['finished']} UTC on {meta['machine']}, commit {meta['commit']}. "
        f"Prompt {meta['prompt']!r}, greedy, {meta['new_tokens']} new tokens; {meta['rounds']} interleaved "
        f"rounds, medians over the rounds that completed; per-run time limit {meta['time_limit_s']:.0f} s. "
        "Each run: a fresh process in a cgroup capped from exec, the machine's page cache dropped first "
        "(`stagejax.memcap`). MiB = 2^20 bytes. tok/s = decode steps after the first token / their time. "
        "First token = seconds from exec (imports, compilation and loading included). cgroup peak "
        "includes the page cache charged to the run. Perplexity: the contestant's weights, measured once "
        f"uncapped ({meta['ppl_chunks']} chunks of 512 tokens of wiki.test.raw read as bytes, llama.cpp "
        "procedure). " + quiet_machine(meta),
        "",
        "| cap MiB | contestant | weights | completed | tok/s (median) | tok/s per round | first token s | "
        "outcome | cgroup peak MiB | decode peak RSS MiB | PPL |",
        "|---:|---|---|---:|---:|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        per_round = " / ".join(f"{v:.2f}" for v in r["tokens_per_s_rounds"]) or "—"
        ppl = "—" if r["ppl"] is None else f"{r['ppl']:.3f} ± {r['ppl_stderr']:.3f}"
        lines.append(f"| {r['cap_mib']} | {r['contestant']} | {r['weight_format']} | {r['completed']} | "
                     f"{_fmt(r['decode_tokens_per_s'], '.2f')} | {per_round} | "
                     f"{_fmt(r['exec_to_first_token_s'], '.1f')} | {r['outcome']} | "
                     f"{_fmt(r['cgroup_peak_mib'], '.1f')} | {_fmt(r['decode_peak_rss_mib'], '.1f')} | {ppl} |")
    lines += ["", "Perplexity commands:", ""]
    lines += [f"- {name}: `{p.get('ppl_command', p.get('ppl_note'))}`" for name, p in meta["ppl"].items()]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], contestants: list[Contestant], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.add_subplot()
    floor = min([r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"]] or [1.0]) / 3
    for index, c in enumerate(contestants):
        mine = sorted((r for r in rows if r["contestant"] == c.name), key=lambda r: r["cap_mib"])
        done = [r for r in mine if r["decode_tokens_per_s"]]
        line, = ax.plot([r["cap_mib"] for r in done], [r["decode_tokens_per_s"] for r in done], "o-", label=c.name)
        failed = [r for r in mine if not r["decode_tokens_per_s"]]
        # One row of crosses per contestant, so a contestant's failures are not hidden by another's.
        ax.scatter([r["cap_mib"] for r in failed], [floor * 0.8 ** index] * len(failed), marker="x",
                   color=line.get_color())
    ax.set_xscale("log")
    ax.set_yscale("log")
    caps = sorted({r["cap_mib"] for r in rows})
    ax.set_xticks(caps, [str(c) for c in caps])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("whole-process memory cap, MiB (cgroup from exec, page cache dropped)")
    ax.set_ylabel("decode tokens/s (median of rounds)")
    ax.set_title("Equal-memory race (x below the lines: did not complete)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", default=",".join(map(str, DEFAULT_CAPS_MIB)), help="MiB, comma-separated")
    parser.add_argument("--stagejax", action="append", metavar="NAME=OVERRIDES",
                        help=f"a stagejax contestant (repeatable); default: {'; '.join(DEFAULT_STAGEJAX)}")
    parser.add_argument("--device", action="append", metavar="NAME=BUNDLE [OPTIONS]",
                        help="a stagejax-device contestant: an exported bundle (repeatable)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--time-limit-s", type=float, default=300.0, help="per run")
    parser.add_argument("--ppl-chunks", type=int, default=4, help="0: skip perplexity")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "race_memory",
                        help="raw run directories")
    parser.add_argument("--results", type=Path, default=REPO / "experiments" / "results" / "race_memory",
                        help="summary files (committed)")
    parser.add_argument("--reuse", action="store_true", help="re-table --results/runs.json without running")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    caps = sorted({int(c) for c in args.caps.split(",")}, reverse=True)
    contestants = ([parse_contestant(s, "stagejax") for s in (args.stagejax or DEFAULT_STAGEJAX)]
                   + [parse_contestant(s, "device") for s in (args.device or [])])
    if not args.no_llama_cpp:
        if importlib.util.find_spec("llama_cpp") is None:
            raise SystemExit("llama-cpp-python is not installed: pip install -e '.[peers]' (compiles "
                             "llama.cpp, ~10 minutes), or pass --no-llama-cpp")
        contestants.insert(0, Contestant(LLAMA_CPP, "llama.cpp", []))
    args.results.mkdir(parents=True, exist_ok=True)

    if args.reuse:
        saved = json.loads((args.results / "runs.json").read_text())
        records, ppl, meta = saved["runs"], saved["ppl"], saved["meta"]
        contestants = [c for c in contestants if any(r["contestant"] == c.name for r in records)]
    else:
        try:
            find_memory_cgroup()
        except CgroupUnavailable as error:
            print(f"race: cannot cap memory on this machine: {error}", file=sys.stderr)
            return 2
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        ppl = {c.name: measure_ppl(c, args) for c in contestants} if args.ppl_chunks else {}
        records = []
        for round_index in range(args.rounds):
            failed_at: dict[str, int] = {}
            for cap in caps:
                # Rotate the order each round so no contestant always runs first after a drop.
                order = contestants[round_index % len(contestants):] + contestants[:round_index % len(contestants)]
                for c in order:
                    if c.name in failed_at:
                        records.append({"round": round_index, "cap_mib": cap, "contestant": c.name,
                                        "status": "skipped", "phase": f"did not complete at {failed_at[c.name]} MiB",
                                        "cgroup_peak_bytes": None})
                        continue
                    record = run_once(c, cap, round_index, args)
                    records.append(record)
                    if record["status"] != COMPLETED:
                        failed_at[c.name] = cap
                    # Kept as the race goes, so a crash or an interrupt loses no finished run.
                    atomic_write_json(args.out / "runs.partial.json", {"ppl": ppl, "runs": records})
                atomic_write_json(args.out / "runs.partial.json", {"ppl": ppl, "runs": records})
        meta = {"command": "python experiments/race_memory.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
                "started": started, "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "machine": f"{cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores",
                "commit": git_commit(), "prompt": args.prompt, "new_tokens": args.new_tokens,
                "rounds": args.rounds, "time_limit_s": args.time_limit_s, "ppl_chunks": args.ppl_chunks,
                "ppl": ppl, "caps_mib": caps, "contestants": [dataclasses.asdict(c) for c in contestants],
                "n_runs": sum(r["status"] != "skipped" for r in records),
                "runs_with_other_processes_mapping": sum(bool(r.get("other_processes_mapping")) for r in records)}
        atomic_write_json(args.results / "runs.json", {"meta": meta, "ppl": ppl, "runs": records})
    rows = summarise(records, contestants, ppl, caps)
    atomic_write_text(args.results / "summary.md", markdown(rows, meta))
    atomic_write_text(args.results / "summary.csv", csv_text(rows, exclude=("tokens_per_s_rounds",)))
    plot(rows, contestants, args.results / "race.png")
    print((args.results / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
