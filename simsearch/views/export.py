"""The app's download of a result set: the neighbours' original files and results.csv, streamed as one ZIP.

A user who found what they were looking for wants to take it away: the images
themselves (byte for byte, not thumbnails) with their scores, classes, tags and
boxes beside them. The archive is written as it is sent (no temporary file, one
read buffer in memory per download), so its size is checked up front from the
files' sizes: past the server's limit the request is refused before a byte goes out.
Images are stored as they are (already compressed); the CSV and the query are deflated.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from simsearch.errors import ExportTooLargeError
from simsearch.views.results_csv import csv_row, csv_text

CHUNK = 1024 * 1024  # bytes read and sent at a time


@dataclass(frozen=True)
class ExportItem:
    """One neighbour of the result set and where its original file is."""

    neighbour: dict  # the neighbour as the app shows it (rank, id, name, score, objects, prediction, tags, ...)
    file: Path | None  # its original file; None when it is gone since the index was built
    size: int  # the file's size in bytes (0 when gone)


def export_items(neighbours: Sequence[dict], files: Sequence[Path | None], limit: int) -> list[ExportItem]:
    """The items of an archive, refused with one line when their files add up to more than `limit` bytes."""
    items = []
    for n, path in zip(neighbours, files):
        try:
            size = path.stat().st_size if path is not None else 0
        except OSError:
            path, size = None, 0
        items.append(ExportItem(n, path, size))
    total = sum(item.size for item in items)
    if total > limit:
        raise ExportTooLargeError(
            f"these {len(items)} results' images add up to {_mb(total)} MB, over the server's export limit of "
            f"{_mb(limit)} MB; download fewer neighbours (a smaller k)")
    return items


def zip_results(query: dict, items: Sequence[ExportItem]) -> Iterator[bytes]:
    """The archive's bytes, in chunks: images/RANK-NAME for each file, then results.csv and query.json.

    results.csv has one row per neighbour (see `results_csv.COLUMNS`) whose `path` is the
    image's name inside the archive (empty for a file that is gone); query.json is what
    was searched with and what the engine saw in it, as the app's search returned it.
    """
    sink = _Sink()
    placed: list[str | None] = []
    with zipfile.ZipFile(sink, "w") as archive:
        width = len(str(len(items)))
        for item in items:
            name = f"images/{item.neighbour['rank']:0{width}d}-{_safe(item.neighbour['name'])}"
            try:
                source = open(item.file, "rb") if item.file is not None else None
            except OSError:  # removed between the size check and now: its row says so with an empty path
                source = None
            if source is None:
                placed.append(None)
                continue
            with source:
                info = zipfile.ZipInfo.from_file(item.file, name)
                info.compress_type = zipfile.ZIP_STORED
                with archive.open(info, "w") as member:
                    while chunk := source.read(CHUNK):
                        member.write(chunk)
                        yield sink.take()
            placed.append(name)
            yield sink.take()
        rows = [csv_row(item.neighbour, name or "") for item, name in zip(items, placed)]
        archive.writestr("results.csv", csv_text(rows), compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("query.json", json.dumps(query, indent=1, ensure_ascii=False) + "\n",
                         compress_type=zipfile.ZIP_DEFLATED)
    yield sink.take()


class _Sink(io.RawIOBase):
    """A write-only, unseekable file that hands over what was written since the last `take`.

    Unseekable on purpose: zipfile then writes each member's sizes after its data, so
    nothing already sent has to be rewritten.
    """

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


def _safe(name: str) -> str:
    """A file name fit to be a member of the archive: no folders, nothing hidden."""
    name = name.replace("\\", "/").rsplit("/", 1)[-1].lstrip(".")
    return name or "image"


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.0f}" if n >= 1024 * 1024 else f"{n / (1024 * 1024):.2f}"

