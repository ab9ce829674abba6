"""Files a command writes (pages, reports, maps, figures): a one-line error where they cannot go, and no half-written file.

A user's `--html`, `--out` or `--png` may name a folder, sit below a file, or point
somewhere read-only; each is said in one line naming the path, and a page written
through a temporary file never leaves that temporary file behind.
"""
from __future__ import annotations

import os
from pathlib import Path

from simsearch.errors import BadInputError


def output_folder(folder: str | os.PathLike) -> Path:
    """`folder`, created with its parents; a BadInputError saying why when it cannot be."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"cannot write into {folder}: it is a file, not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInputError(f"cannot create the folder {folder}: {e.strerror or e}; choose another path") from None
    return folder


def output_file(out: str | os.PathLike) -> Path:
    """`out` as a file path whose folder exists: refused when it names a folder."""
    out = Path(out)
    if out.is_dir():
        raise BadInputError(f"cannot write {out}: it is a folder; give a file name such as {out / 'page.html'}")
    output_folder(out.parent)
    return out


def write_text(out: str | os.PathLike, text: str) -> Path:
    """Write `text` to `out` whole (through a temporary file beside it, removed on failure); returns the path."""
    out = output_file(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BadInputError(f"cannot write {out}: {e.strerror or e}; choose another path") from None
    return out
