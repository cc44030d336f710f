"""The checkpoints directory: conversion interrupted by real signals, concurrent conversions,
stale temporaries, unusable checkpoints replaced, file-system errors that name paths.cache, and
`python -m stagejax.cache` (ls / verify / clean).

Interrupts are sent to a child process (`tests/convert_child.py`) at controlled points: while
orbax's writer threads write (files appearing in the temporary), or when it starts checksumming.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from stagejax import cache as cache_cli
from stagejax.loading import open_model
from stagejax.store import (CheckpointError, Manifest, WeightStore, checkpoint_path,
                            convert_checkpoint)
from stagejax.store import checkpoints
from stagejax.store import convert as convert_module

CHILD = Path(__file__).with_name("convert_child.py")


def random_tiny(seed: int = 0):
    """The tiny preset with random numpy weights (no `init_params` compile)."""
    handle = open_model("tiny")
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(lambda leaf: rng.standard_normal(leaf.shape, dtype=np.float32),
                                    handle.abstract_params())
    return dataclasses.replace(handle, _read_params=lambda: params)


def entries(cache: Path) -> list[str]:
    directory = cache / "checkpoints"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def debris(cache: Path) -> list[str]:
    return [name for name in entries(cache) if name.startswith(".")]


def start_child(cache: Path, *args, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CHILD), str(cache), *args],
                            stdout=subprocess.PIPE, stderr=stderr, text=True)


def exit_status(child: subprocess.Popen, stderr_path: Path, timeout_s: float) -> int:
    """The child's exit status; if it has not exited in `timeout_s`, fail with every thread's
    stack (its faulthandler prints them on SIGUSR1) and what else it wrote to stderr."""
    try:
        return child.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGUSR1)
        time.sleep(2)
        pytest.fail(f"the child did not exit in {timeout_s:.0f} s; its stderr, with its "
                    f"threads' stacks:\n{stderr_path.read_text()[-8000:]}")


def read_until(stream, text: str) -> list[str]:
    lines = []
    while True:
        line = stream.readline()
        assert line, f"the child ended before printing {text!r}: {lines}"
        lines.append(line)
        if text in line:
            return lines


def wait_for(condition, timeout_s: float = 60) -> bool:
    """Poll `condition()` until true (a child's files appear; a reaper finishes)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def orbax_files(cache: Path) -> int:
    return sum(len(files) for temporary in (cache / "checkpoints").glob(".tmp-*")
               for _, _, files in os.walk(temporary))


# -- interrupts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sig,point", [
    (signal.SIGINT, "save"), (signal.SIGKILL, "save"),
    pytest.param(signal.SIGTERM, "save", marks=pytest.mark.slow),
    pytest.param(signal.SIGINT, "checksum", marks=pytest.mark.slow)])
def test_an_interrupted_conversion_leaves_nothing_behind(tmp_path, sig, point):
    """Ctrl-C, SLURM's SIGTERM or a SIGKILL while orbax writes (or while its files are
    checksummed): no temporary, lock or half checkpoint survives the process."""
    cache = tmp_path / "cache"
    # "save": the writer stalls after orbax's files are written, so the signal cannot come late
    stderr_path = tmp_path / "child-stderr.txt"
    with stderr_path.open("w") as stderr:  # a file: an unread pipe that fills would block it
        child = start_child(cache, *(["--stall-after-save"] if point == "save" else []),
                            stderr=stderr)
    try:
        read_until(child.stdout, "saved" if point == "save" else "checksum")
        if point == "save":
            assert orbax_files(cache) >= 100, "orbax wrote nothing"
        child.send_signal(sig)
        assert exit_status(child, stderr_path, timeout_s=120) == -sig
    finally:
        child.kill()
    # The reaper (or, for SIGINT, the process itself) removes the temporary and the lock file.
    assert wait_for(lambda: entries(cache) == [], timeout_s=30), entries(cache)


def test_stale_temporaries_go_at_the_next_conversion_and_live_ones_stay(tmp_path):
    """Reaper and converter killed together (a SLURM job's processes): the next conversion
    removes what they left, but never the temporary of a conversion that holds its lock."""
    directory = tmp_path / "checkpoints"
    dead = directory / ".tmp-other-none-0123-abc"
    live = directory / ".tmp-busy-none-4567-def"
    for temporary in (dead, live):
        (temporary / "checkpoint").mkdir(parents=True)
        (temporary / "checkpoint" / "0.0").write_bytes(b"x" * 100)
    (directory / ".gone-none-89ab.lock").write_text("somehost 1\n")  # its holder died
    busy = checkpoints.CheckpointLock(directory, "busy-none-4567")
    assert busy.acquire(blocking=False)
    try:
        path = convert_checkpoint(random_tiny(), tmp_path, progress=False)
        assert entries(tmp_path) == sorted([path.name, live.name, busy.path.name])
    finally:
        busy.release()
    assert entries(tmp_path) == sorted([path.name, live.name])  # until its own next conversion


def test_concurrent_conversions_of_one_checkpoint_do_the_work_once(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    first = start_child(cache, "--hold", str(go))
    second = None
    try:
        assert wait_for(lambda: any(n.endswith(".lock") for n in entries(cache)))  # first holds it
        second = start_child(cache)
        read_until(second.stderr, "waiting for pid")
        go.touch()
        out_first, _ = first.communicate(timeout=120)
        out_second, err_second = second.communicate(timeout=120)
    finally:
        for child in (first, second):
            if child is not None:
                child.kill()
    assert first.returncode == 0 and second.returncode == 0, err_second[-2000:]
    converted, found = out_first.split()[-2:], out_second.split()[-2:]
    assert converted[0] == "converted" and found[0] == "found" and converted[1] == found[1]
    assert "writing" not in out_second
    assert debris(cache) == []


# -- unusable checkpoints are replaced, not reported back ----------------------------------------


def break_version(path: Path):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 0
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", [
    break_version,
    lambda path: (path / "manifest.json").write_text("{not json"),
    lambda path: (path / Manifest.read(path).arrays["L1/o/w"].file).unlink(),
    lambda path: os.truncate(path / Manifest.read(path).arrays["L1/o/w"].file, 8),
], ids=["other-version", "corrupt-manifest", "deleted-array", "truncated-array"])
def test_an_unusable_checkpoint_is_converted_again(tmp_path, damage, caplog):
    handle = random_tiny()
    path = convert_checkpoint(handle, tmp_path, progress=False)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="stagejax"):
        assert convert_checkpoint(handle, tmp_path, progress=False) == path
    assert "is unusable" in caplog.text and "converting it again" in caplog.text
    assert checkpoints.verify(path) == []
    assert debris(tmp_path) == []


def test_a_broken_checkpoint_names_the_command_that_replaces_it(tmp_path):
    handle = random_tiny()
    path = convert_checkpoint(handle, tmp_path, ffn_chunks=2, vocab_chunk=100, progress=False)
    file = path / Manifest.read(path).arrays["L0/q/1/w"].file
    file.write_bytes(b"\xff" + file.read_bytes()[1:])
    command = (f"python -m stagejax.cache clean {path} && python -m stagejax.convert model=tiny "
               f"quant=none ffn_chunks=2 vocab_chunk=100 checksum=xxh3_64 paths.cache={tmp_path}")
    with pytest.raises(CheckpointError, match="L0/q/1/w") as error:
        WeightStore(path, verify="open")
    assert command in str(error.value)
    break_version(path)
    with pytest.raises(CheckpointError, match="format version 0") as error:
        WeightStore(path)
    assert f"python -m stagejax.cache clean {path}" in str(error.value)


# -- file-system errors name paths.cache --------------------------------------------------------


def test_a_cache_that_is_not_a_directory_is_named(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(checkpoints.CacheDirError, match=f"paths.cache={not_a_dir}: cannot create"):
        convert_checkpoint(random_tiny(), not_a_dir, progress=False)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MB tmpfs (needs root's mount; skipped elsewhere)."""
    mount = tmp_path / "mnt"
    mount.mkdir()

    def make(options: str) -> Path:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_read_only_cache_is_named(small_tmpfs):
    mount = small_tmpfs("ro,size=1m")
    with pytest.raises(checkpoints.CacheDirError,
                       match=f"paths.cache={mount}: cannot .*Read-only file system.*you can write"):
        convert_checkpoint(random_tiny(), mount, progress=False)


def test_calibrating_into_a_read_only_cache_is_named(small_tmpfs):
    from stagejax.calibration import calibrate

    mount = small_tmpfs("ro,size=1m")
    with pytest.raises(checkpoints.CacheDirError, match=f"paths.cache={mount}: cannot create"):
        calibrate(mount, quick=True)


def test_a_full_cache_is_named_before_writing(small_tmpfs):
    mount = small_tmpfs("size=1m")
    with pytest.raises(checkpoints.CacheDirError,
                       match=f"paths.cache={mount}: the checkpoint needs .* MB free"):
        convert_checkpoint(random_tiny(), mount, progress=False)
    assert debris(mount) == []


def test_a_write_that_runs_out_of_space_is_named(tmp_path, monkeypatch):
    """tensorstore's own error (a ValueError) when the disk fills during orbax's save."""
    def full(*args, **kwargs):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x/0.0\": No space left "
                         "on device [os_error_code='28']")

    monkeypatch.setattr(convert_module, "_describe_stored", full)
    with pytest.raises(checkpoints.CacheDirError, match=f"paths.cache={tmp_path}: cannot write "
                                                        ".*RESOURCE_EXHAUSTED.*free space"):
        convert_checkpoint(random_tiny(), tmp_path, progress=False)
    assert debris(tmp_path) == []
    monkeypatch.setattr(convert_module, "_describe_stored", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # not a file-system error: passed on as it is
        convert_checkpoint(random_tiny(), tmp_path, progress=False)
    read_only = OSError(errno.EROFS, "Read-only file system", str(tmp_path / "checkpoints"))
    assert checkpoints.cache_dir_error(tmp_path, read_only, "write") is not None
    elsewhere = FileNotFoundError(errno.ENOENT, "No such file", "/models/source.gguf")
    assert checkpoints.cache_dir_error(tmp_path, elsewhere, "write") is None


def test_the_c_reader_is_built_under_paths_cache(tmp_path):
    """In a fresh process (a process loads the reader once): built where the run's
    paths.cache says, not under $STAGEJAX_CACHE."""
    code = ("import sys; from stagejax_device import native_stream; "
            "assert native_stream.library(sys.argv[1]) is not None, native_stream.library_error()")
    env = {**os.environ, "STAGEJAX_CACHE": str(tmp_path / "elsewhere")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache" / "native")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "cache" / "native").glob("stream-*.so"))
    assert not (tmp_path / "elsewhere").exists()


def test_orbax_logs_nothing_through_hydras_logging(tmp_path, caplog):
    with caplog.at_level(logging.DEBUG):
        convert_checkpoint(random_tiny(), tmp_path, progress=False)
    assert [r.getMessage()[:80] for r in caplog.records if r.name == "absl"] == []


# -- python -m stagejax.cache -------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str]:
    status = cache_cli.main(list(argv))
    return status, capsys.readouterr().out


def test_cache_ls_verify_clean(tmp_path, capsys):
    good = convert_checkpoint(random_tiny(), tmp_path, progress=False)
    bad = convert_checkpoint(random_tiny(seed=1), tmp_path, vocab_chunk=100, progress=False)
    os.truncate(bad / Manifest.read(bad).arrays["L2/ffn/0/down"].file, 12)
    (tmp_path / "checkpoints" / ".tmp-gone-none-1-xyz").mkdir()

    status, out = run_cli(capsys, "--cache", str(tmp_path), "ls")
    assert status == 0
    size = checkpoints.directory_bytes(good) / 1e6
    assert f"{good.name}" in out and f"{size:,.1f}" in out and "ok" in out
    assert f"unusable: array 'L2/ffn/0/down'" in out
    assert ".tmp-gone-none-1-xyz" in out and "stale" in out

    status, out = run_cli(capsys, "--cache", str(tmp_path), "verify", "--all")
    assert status == 1
    assert f"ok: {good}" in out and f"FAILED: {bad}" in out
    assert f"python -m stagejax.cache clean {bad} && python -m stagejax.convert" in out

    status, out = run_cli(capsys, "--cache", str(tmp_path), "clean", "--stale", bad.name)
    assert status == 0 and f"removed {bad}" in out
    assert entries(tmp_path) == [good.name]
    busy = checkpoints.CheckpointLock(tmp_path / "checkpoints", good.name)
    assert busy.acquire(blocking=False)
    try:
        status, out = run_cli(capsys, "--cache", str(tmp_path), "clean", "--all")
        assert status == 1 and "is being converted by pid" in out and good.exists()
    finally:
        busy.release()
    assert run_cli(capsys, "--cache", str(tmp_path), "clean", "--all")[0] == 0
    assert entries(tmp_path) == []
    with pytest.raises(SystemExit, match="no checkpoint 'nope'"):
        cache_cli.main(["--cache", str(tmp_path), "verify", "nope"])


def test_checkpoint_path_is_where_conversion_puts_it(tmp_path):
    handle = random_tiny()
    assert checkpoint_path(handle, tmp_path) == convert_checkpoint(handle, tmp_path, progress=False)
