"""Writing result files atomically (a crash or interrupt never leaves half a file), and the
CSV text every results table is written as."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to a temporary file in the same directory, fsync it, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def csv_text(rows: Sequence[dict], exclude: Iterable[str] = ()) -> str:
    """`rows` as CSV: the columns are every key any row has, in first-seen order, less
    `exclude`; a row without a column leaves it empty. No rows: the empty string."""
    if not rows:
        return ""
    skip = set(exclude)
    columns = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in skip]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
