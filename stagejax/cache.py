"""`python -m stagejax.cache`: list, verify and remove the stage-shard checkpoints in `paths.cache`.

    python -m stagejax.cache ls                      # checkpoints, sizes, state; temporaries
    python -m stagejax.cache verify NAME|PATH|--all  # every array's size and every checksum
    python -m stagejax.cache clean NAME|PATH ...     # remove checkpoints (--all: every one)
    python -m stagejax.cache clean --stale           # temporaries of conversions that died

`--cache DIR` names the cache (default `$STAGEJAX_CACHE` or `~/.cache/stagejax`, as
`paths.cache`). A checkpoint that fails verification is named with the command that replaces
it; checkpoints being converted are never removed. The work is `stagejax.store.checkpoints`'.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from stagejax.store import checkpoints
from stagejax.store.convert import resolve_cache_dir
from stagejax_device.manifest import CheckpointError, Manifest


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.1f}"


def _resolve(cache_dir: Path, name: str) -> Path:
    """A checkpoint named as `ls` lists it, or given as a path."""
    path = Path(name).expanduser()
    if path.is_dir() and (path.parent.name == checkpoints.CHECKPOINTS or (path / "manifest.json").exists()):
        return path.resolve()
    candidate = cache_dir / checkpoints.CHECKPOINTS / name
    if candidate.is_dir():
        return candidate
    raise SystemExit(f"stagejax.cache: no checkpoint {name!r} in {cache_dir / checkpoints.CHECKPOINTS} "
                     "(python -m stagejax.cache ls lists them)")


def list_command(cache_dir: Path) -> int:
    found, temporaries = checkpoints.list_checkpoints(cache_dir)
    directory = cache_dir / checkpoints.CHECKPOINTS
    total = sum(e.nbytes for e in found + temporaries)
    print(f"{directory}: {len(found)} checkpoint(s), {_mb(total)} MB")
    if found:
        width = max(len(e.name) for e in found)
        print(f"  {'name':<{width}}  {'model':<14} {'quant':<14} {'MB':>9}  {'created':<16}  state")
    for entry in found:
        manifest = entry.manifest
        created = manifest.extra.get("created_unix_s") if manifest else None
        when = datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M") if created else "?"
        state = "ok" if entry.problem is None else f"unusable: {entry.problem}"
        print(f"  {entry.name:<{width}}  {manifest.model_name if manifest else '?':<14} "
              f"{manifest.conversion['quant'] if manifest else '?':<14} {_mb(entry.nbytes):>9}  "
              f"{when:<16}  {state}")
    for entry in temporaries:
        state = (f"being written by {entry.holder}" if entry.holder else
                 "stale (its conversion died): python -m stagejax.cache clean --stale, or the "
                 "next conversion, removes it")
        print(f"  {entry.name}  {_mb(entry.nbytes)} MB  {state}")
    if any(e.problem for e in found):
        print("Unusable checkpoints are converted again by the next run that needs them; "
              "python -m stagejax.cache clean NAME removes one now.")
    return 0


def verify_command(cache_dir: Path, names: list[str], every: bool) -> int:
    paths = ([e.path for e in checkpoints.list_checkpoints(cache_dir)[0]] if every
             else [_resolve(cache_dir, n) for n in names])
    if not paths:
        print(f"no checkpoints in {cache_dir / checkpoints.CHECKPOINTS}")
        return 0
    failed = 0
    for path in paths:
        problems = checkpoints.verify(path)
        if not problems:
            manifest = Manifest.read(path)
            print(f"ok: {path} ({len(manifest.arrays)} arrays, {_mb(manifest.nbytes)} MB, every "
                  f"{manifest.conversion['checksum']} checksum matches)")
            continue
        failed += 1
        print(f"FAILED: {path}")
        for problem in problems[:10]:
            print(f"  {problem}")
        if len(problems) > 10:
            print(f"  ... and {len(problems) - 10} more")
        print(f"  {checkpoints.remedy(path)}")
    return 1 if failed else 0


def clean_command(cache_dir: Path, names: list[str], every: bool, stale: bool) -> int:
    directory = cache_dir / checkpoints.CHECKPOINTS
    if not (names or every or stale):
        raise SystemExit("stagejax.cache clean: say what to remove: checkpoint names (from "
                         "`python -m stagejax.cache ls`), --stale or --all")
    status = 0
    if stale and directory.is_dir():
        for path in checkpoints.remove_stale(directory):
            print(f"removed {path}")
    paths = ([e.path for e in checkpoints.list_checkpoints(cache_dir)[0]] if every
             else [_resolve(cache_dir, n) for n in names])
    for path in paths:
        size = checkpoints.directory_bytes(path)
        try:
            checkpoints.remove(path)
        except CheckpointError as error:
            print(f"kept {path}: {error}")
            status = 1
            continue
        print(f"removed {path} ({_mb(size)} MB)")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stagejax.cache", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", help="the cache directory (paths.cache); default "
                                        "$STAGEJAX_CACHE or ~/.cache/stagejax")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("ls", help="list checkpoints with their sizes and state")
    verify = commands.add_parser("verify", help="check every array and checksum of checkpoints")
    verify.add_argument("names", nargs="*", help="checkpoint names (as `ls` lists them) or paths")
    verify.add_argument("--all", action="store_true", help="every checkpoint")
    clean = commands.add_parser("clean", help="remove checkpoints, or stale temporaries")
    clean.add_argument("names", nargs="*", help="checkpoint names (as `ls` lists them) or paths")
    clean.add_argument("--all", action="store_true", help="every checkpoint")
    clean.add_argument("--stale", action="store_true", help="temporaries of dead conversions")
    args = parser.parse_args(argv)
    cache_dir = resolve_cache_dir(args.cache)
    if args.command == "ls":
        return list_command(cache_dir)
    if args.command == "verify":
        if not (args.names or args.all):
            parser.error("verify: name checkpoints, or --all")
        return verify_command(cache_dir, args.names, args.all)
    return clean_command(cache_dir, args.names, args.all, args.stale)


if __name__ == "__main__":
    sys.exit(main())
