"""The checkpoints directory, `${paths.cache}/checkpoints`: writing into it safely, and what it holds.

Conversion (`stagejax.store.convert`) relies on three guarantees given here:
- **One writer per checkpoint.** `CheckpointLock` is an flock(2) on `.<name>.lock` that names
  its holder (host, pid); a second process converting the same checkpoint waits for the first,
  then finds the checkpoint done. The kernel releases the lock however its holder dies.
- **Nothing half-written survives.** A checkpoint is written into a temporary directory
  `.tmp-<name>-*` (`Staging`) and renamed into place. When the writing process dies before it
  removes the temporary itself (SIGTERM, SIGKILL, the OOM killer, or an exit while orbax's
  writer threads still write after an interrupt), a reaper removes it: a `sh` child started
  with the temporary, in a session of its own, waiting for the end of a pipe that only the
  writer's death (or its own clean-up) closes. Should the reaper die too (a SLURM job's
  processes are killed together), the next conversion removes every temporary whose lock no
  live process holds (`remove_stale`).
- **File-system errors name `paths.cache`** and what to do about them (`CacheDirError`).

It also says what the directory holds, for `python -m stagejax.cache`: `list_checkpoints`,
`problem` (the quick check a cache hit makes: manifest, format version, model, and every array
file present at its size), `verify` (every checksum of every array), `remove`.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Callable, TypeVar

from stagejax.model_config import ModelConfig
from stagejax_device.manifest import (CHECKPOINTS, CheckpointError, Manifest,  # noqa: F401
                                     checksum_function, convert_command, remedy)

TMP_PREFIX = ".tmp-"
LOCK_SUFFIX = ".lock"
# Beyond the arrays' bytes, a conversion writes per array a directory, its .zarray and orbax's
# metadata: a few file-system blocks each.
PER_ARRAY_OVERHEAD_BYTES = 16 * 1024
MIN_FREE_MARGIN_BYTES = 16 * 2**20

T = TypeVar("T")


class CacheDirError(RuntimeError):
    """`paths.cache` cannot be written: read-only, not a directory, or full. The message names
    the directory, the error, and what to do."""


def cache_dir_error(cache_dir: Path, error: BaseException, doing: str) -> CacheDirError | None:
    """The `CacheDirError` for a file-system `error` met while `doing` something under
    `cache_dir`, or None when `error` is not a file-system error (it is then re-raised as is).
    tensorstore (under orbax) reports them as ValueError("RESOURCE_EXHAUSTED: ... [os_error_code=...]")."""
    text = str(error)
    if isinstance(error, OSError) and error.filename is not None:
        inside = os.path.abspath(error.filename).startswith(os.path.abspath(cache_dir) + os.sep)
        if not inside and os.path.abspath(error.filename) != os.path.abspath(cache_dir):
            return None  # e.g. the model's source file: not the cache's fault
    code = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if code is None:
        for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM"):
            if f"os_error_code='{getattr(errno, name)}'" in text:
                code = getattr(errno, name)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "RESOURCE_EXHAUSTED" in text
    read_only = code in (errno.EROFS, errno.EACCES, errno.EPERM)
    if full:
        what = ("free space there, or set paths.cache (or $STAGEJAX_CACHE) to a directory on a "
                "file system with room")
    elif read_only:
        what = "set paths.cache (or $STAGEJAX_CACHE) to a directory you can write"
    elif isinstance(error, OSError):
        what = "set paths.cache (or $STAGEJAX_CACHE) to a writable directory with free space"
    else:
        return None
    reason = f"{error.strerror}: {error.filename}" if isinstance(error, OSError) and error.strerror else text
    return CacheDirError(f"paths.cache={cache_dir}: cannot {doing} ({reason[:400]}); {what}")


def make_dir(path: Path, cache_dir: Path) -> Path:
    """`path` (under `cache_dir`) as an existing directory this process can write, or a
    `CacheDirError` saying why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    except OSError as error:
        raise cache_dir_error(cache_dir, error, f"create or write {path}") from error
    return path


def check_free_space(directory: Path, needed_bytes: int, cache_dir: Path) -> None:
    """Refuse to start writing `needed_bytes` where there is not room for them (before minutes
    of work, rather than a RESOURCE_EXHAUSTED from tensorstore half-way)."""
    free = shutil.disk_usage(directory).free
    if free < needed_bytes + MIN_FREE_MARGIN_BYTES:
        raise CacheDirError(
            f"paths.cache={cache_dir}: the checkpoint needs {needed_bytes / 1e6:.1f} MB and "
            f"{directory} has {free / 1e6:.1f} MB free; free space there, remove checkpoints "
            "you no longer need (python -m stagejax.cache ls, then clean), or set paths.cache "
            "(or $STAGEJAX_CACHE) to a directory on a file system with room")


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


class CheckpointLock:
    """An exclusive lock on one checkpoint name, held while it is converted or removed.

    flock(2) on `<checkpoints>/.<name>.lock`, so the kernel releases it when the holder dies.
    The file names the holder (host and pid, for messages). The holder unlinks it on release,
    so lock files do not accumulate; a waiter that then holds an unlinked file locks again.
    """

    def __init__(self, directory: Path, name: str):
        self.path = directory / f".{name}{LOCK_SUFFIX}"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True,
                on_wait: Callable[[str], None] | None = None) -> bool:
        """Take the lock; if another process holds it, wait (calling `on_wait(holder)` first)
        or, with blocking=False, return False."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if not blocking:
                        os.close(fd)
                        return False
                    if on_wait is not None:
                        on_wait(self.holder())
                    fcntl.flock(fd, fcntl.LOCK_EX)
                if _same_file(fd, self.path):
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)
                    self._fd = fd
                    return True
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # its holder unlinked it on release: lock the current file

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def holder(self) -> str:
        """Who holds the lock, as its file says ("pid 123 on host n1")."""
        try:
            host, pid = self.path.read_text().split()
            return f"pid {pid} on host {host}"
        except (OSError, ValueError):
            return "another process"


_REAPER = ('cat >/dev/null; rm -rf -- "$1"; '
           'if [ -e "$2" ] && command -v flock >/dev/null; then flock -n "$2" rm -f -- "$2"; fi; '
           'exit 0')


class Staging:
    """A temporary directory `.tmp-<name>-*` in `directory`, where checkpoint `name` is written
    while `lock` is held; `close()` removes it and releases the lock.

    If this process dies first, its reaper removes the directory (see the module docstring).
    `run_writer` runs the writing on a daemon thread so that an interrupt returns at once
    even while orbax's writer threads (created on it, so daemons too) still write: the
    directory and the lock then stay with that thread, which removes and releases them when
    the writing ends — or the process exits, and the reaper removes the directory.
    """

    def __init__(self, directory: Path, name: str, lock: CheckpointLock):
        self.lock = lock
        self.root = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=directory))
        self._handed_over = False
        self._state = threading.Lock()
        try:
            # `cat` returns when the pipe's last writer closes it: our close(), or our death.
            # The lock file goes too if nobody holds it (unlinked under the lock, as `release`
            # does; util-linux's flock(1) where installed, else the next conversion does it).
            self._reaper = subprocess.Popen(
                ["sh", "-c", _REAPER, "stagejax-reaper", str(self.root), str(lock.path)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # not in the terminal's process group: Ctrl-C spares it
        except OSError:
            self._reaper = None  # no sh: stale temporaries still go at the next conversion

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc_info) -> None:
        if not self._handed_over:
            self.close()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self.lock.release()
        if self._reaper is not None:
            self._reaper.stdin.close()
            self._reaper.wait()
            self._reaper = None

    def run_writer(self, write: Callable[[], T]) -> T:
        """`write()` on a daemon thread, waited for so that an interrupt (KeyboardInterrupt)
        stops the wait at once; the interrupted write finishes in the background and its
        thread then closes this staging (see the class docstring)."""
        outcome: dict = {}
        done = threading.Event()

        def target():
            try:
                outcome["value"] = write()
            except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = error
            with self._state:
                done.set()
                abandoned = self._handed_over
            if abandoned:
                self.close()

        threading.Thread(target=target, name="stagejax-checkpoint-writer", daemon=True).start()
        try:
            while not done.wait(0.1):
                pass
        except BaseException:
            with self._state:
                self._handed_over = not done.is_set()
            raise
        if "error" in outcome:
            raise outcome["error"]
        return outcome.get("value")


def _checkpoint_name(temporary: Path) -> str:
    """The checkpoint a `.tmp-<name>-<random>` directory was written for (mkdtemp's random
    suffix has no '-')."""
    return temporary.name[len(TMP_PREFIX):].rsplit("-", 1)[0]


def temporaries(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob(f"{TMP_PREFIX}*") if p.is_dir())


def remove_stale(directory: Path, own: str | None = None) -> list[Path]:
    """Remove temporaries (and lock files) left by dead processes: those whose checkpoint's
    lock nobody holds. `own`: a checkpoint whose lock the caller holds (its temporaries are
    stale by definition). A live conversion's temporary is never touched. Returns what went."""
    removed = []
    for temporary in temporaries(directory):
        name = _checkpoint_name(temporary)
        if name == own:
            shutil.rmtree(temporary, ignore_errors=True)
            removed.append(temporary)
            continue
        lock = CheckpointLock(directory, name)
        if lock.acquire(blocking=False):
            try:
                shutil.rmtree(temporary, ignore_errors=True)
                removed.append(temporary)
            finally:
                lock.release()
    for lock_file in directory.glob(f".*{LOCK_SUFFIX}"):
        name = lock_file.name[1:-len(LOCK_SUFFIX)]
        if name != own:
            lock = CheckpointLock(directory, name)
            if lock.acquire(blocking=False):
                lock.release()  # unlinks it
    return removed


def problem(path: Path, config: ModelConfig | None = None,
            model_name: str | None = None) -> str | None:
    """What makes the checkpoint at `path` unusable, found cheaply (no array is read): no
    readable manifest of this format version, another model, a missing file, or an array file
    of another size. None: usable as far as that goes (a store checks the bytes on open)."""
    try:
        manifest = Manifest.read(path)
        manifest.check_matches(config, model_name)
    except CheckpointError as error:
        return str(error)
    for info in manifest.arrays.values():
        file = path / info.file
        try:
            size = os.stat(file).st_size
        except FileNotFoundError:
            return f"array {info.key!r} is missing (no file {file})"
        if size != info.nbytes:
            return f"array {info.key!r}: {file} holds {size} bytes, the manifest says {info.nbytes}"
    if manifest.tokenizer_info is not None and not (path / manifest.tokenizer_info["file"]).is_file():
        return f"the tokenizer file {path / manifest.tokenizer_info['file']} is missing"
    return None


def verify(path: Path, on_array: Callable[[int], None] | None = None) -> list[str]:
    """Every problem of the checkpoint at `path`: the manifest, then every array's size and
    every checksum block, and the tokenizer's sha256. Empty: the checkpoint is intact.
    `on_array(nbytes)` is called after each array (progress)."""
    try:
        manifest = Manifest.read(path)
    except CheckpointError as error:
        return [str(error)]
    checksum = checksum_function(manifest.conversion["checksum"])
    problems = []
    for info in manifest.arrays.values():
        file = path / info.file
        try:
            data = memoryview(file.read_bytes())
        except FileNotFoundError:
            problems.append(f"array {info.key!r} is missing (no file {file})")
            continue
        if len(data) != info.nbytes:
            problems.append(f"array {info.key!r}: {file} holds {len(data)} bytes, the manifest "
                            f"says {info.nbytes}")
            continue
        block = max(1, info.block_bytes)
        starts = range(0, max(1, len(data)), block)
        if len(starts) != len(info.checksums):
            problems.append(f"array {info.key!r}: the manifest has {len(info.checksums)} "
                            f"checksums for {len(starts)} blocks")
            continue
        bad = [i for i, (start, expected) in enumerate(zip(starts, info.checksums))
               if checksum(data[start:start + block]) != expected]
        if bad:
            problems.append(f"array {info.key!r}: {len(bad)} of {len(starts)} blocks of {file} "
                            f"fail their {manifest.conversion['checksum']} checksum (first: "
                            f"block {bad[0]}, bytes {bad[0] * block}..{min(len(data), (bad[0] + 1) * block)})")
        if on_array is not None:
            on_array(info.nbytes)
    if manifest.tokenizer_info is not None:
        file = path / manifest.tokenizer_info["file"]
        try:
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
        except FileNotFoundError:
            problems.append(f"the tokenizer file {file} is missing")
        else:
            if digest != manifest.tokenizer_info["sha256"]:
                problems.append(f"the tokenizer file {file} has changed (sha256 {digest[:16]}…)")
    return problems


def directory_bytes(path: Path) -> int:
    """Bytes of every file under `path` (as `du --apparent-size` counts them)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # removed while we looked
    return total


@dataclasses.dataclass
class Entry:
    """One directory in `checkpoints/`: a checkpoint, or a temporary of a conversion."""

    path: Path
    nbytes: int
    problem: str | None = None  # checkpoints: `problem()`; None: usable
    manifest: Manifest | None = None
    holder: str | None = None  # temporaries: who is writing it; None: stale (nobody)

    @property
    def name(self) -> str:
        return self.path.name


def list_checkpoints(cache_dir: Path) -> tuple[list[Entry], list[Entry]]:
    """(checkpoints, temporaries) under `cache_dir/checkpoints`, each with its size."""
    directory = cache_dir / CHECKPOINTS
    if not directory.is_dir():
        return [], []
    checkpoints = []
    for path in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            manifest = Manifest.read(path)
        except CheckpointError:
            manifest = None
        checkpoints.append(Entry(path, directory_bytes(path), problem(path), manifest))
    temps = []
    for path in temporaries(directory):
        lock = CheckpointLock(directory, _checkpoint_name(path))
        holder = None
        if lock.acquire(blocking=False):
            lock.release()
        else:
            holder = lock.holder()
        temps.append(Entry(path, directory_bytes(path), holder=holder))
    return checkpoints, temps


def remove(path: Path) -> None:
    """Remove the checkpoint at `path` (a directory in some `checkpoints/`), unless a
    conversion holds it. It is first renamed to a temporary, so an interrupted removal leaves
    a stale temporary (removed by the next conversion), never half a checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    lock = CheckpointLock(path.parent, path.name)
    if not lock.acquire(blocking=False):
        raise CheckpointError(f"{path} is being converted by {lock.holder()}; try again when "
                              "it is done")
    try:
        trash = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{path.name}-", dir=path.parent))
        os.rename(path, trash / "removed")
        shutil.rmtree(trash)
    finally:
        lock.release()

