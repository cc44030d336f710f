"""Evaluation and training text: locating `paths.data` and verifying file checksums.

Checksums are those of `../shared/data/README.md`; a changed file must not silently change a
reported number, so a mismatch is an error.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

SHA256 = {
    "wikitext-2/wiki.test.raw": "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
    "wikitext-2/wiki.valid.tokens": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "pydocs/train.txt": "42e7765d43e8062098afdf964b697751154545d6ab78fa142cf06b695e365536",
    "pydocs/valid.txt": "923f6df1b91a971db1e4bbfd7d0a074fa39968c9d3d7303bd9af727fb0260f03",
    "pydocs/test.txt": "124b16a1ad54db086e3e8482f17a0c639e334b9e5b85529669c455db4260a8b5",
}


def default_data_dir() -> Path:
    """`$STAGEJAX_DATA`, else `../shared/data` relative to the repository root (design §6)."""
    return Path(os.environ.get("STAGEJAX_DATA", REPO_ROOT.parent / "shared" / "data"))


def resolve_data_dir(path: str | os.PathLike | None) -> Path:
    if path is None:
        return default_data_dir()
    path = Path(path).expanduser()
    return path if path.is_absolute() else (REPO_ROOT / path).resolve()


TEXT_MODES = ("bytes", "text")


def read_text(relative: str, data_dir: str | os.PathLike | None = None,
              text_mode: str = "bytes", verify: bool = True) -> str:
    """The text of a data file, after checking its sha256 against the data README's.

    `text_mode` "bytes": the file's bytes decoded as they are, line ends included (llama.cpp's
    `perplexity -f` reads them so; wiki.test.raw has CRLF line ends). "text": as Python's text
    mode reads it (universal newlines: CRLF and CR become LF), as most Python tools see it.
    """
    return "".join(iter_text(relative, data_dir, text_mode, verify))


READ_CHUNK_BYTES = 1 << 16


def iter_text(relative: str, data_dir: str | os.PathLike | None = None,
              text_mode: str = "bytes", verify: bool = True,
              chunk_bytes: int = READ_CHUNK_BYTES):
    """`read_text`'s text in consecutive pieces of about `chunk_bytes` bytes (joined, exactly
    the same text), so a reader that needs only the beginning never holds the whole file.
    The checksum is verified over the whole file first, in chunks too."""
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
    path = resolve_data_dir(data_dir) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"data file {path} not found; set paths.data (or $STAGEJAX_DATA) to the directory "
            f"holding {relative}")
    if verify and relative in SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(chunk_bytes), b""):
                digest.update(block)
        if digest.hexdigest() != SHA256[relative]:
            raise ValueError(f"{path} has sha256 {digest.hexdigest()}, expected {SHA256[relative]}: "
                             "the file changed, so its numbers would not be comparable; restore it")
    return _decoded_chunks(path, text_mode, chunk_bytes)


def _decoded_chunks(path: Path, text_mode: str, chunk_bytes: int):
    decoder = codecs.getincrementaldecoder("utf-8")()  # a character split across chunks waits
    held = ""  # text mode: a CR at a chunk's end may be the first half of a CRLF
    with open(path, "rb") as file:
        while True:
            raw = file.read(chunk_bytes)
            text = held + decoder.decode(raw, final=not raw)
            held = ""
            if text_mode == "text":
                if raw and text.endswith("\r"):
                    text, held = text[:-1], "\r"
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text
            if not raw:
                return
