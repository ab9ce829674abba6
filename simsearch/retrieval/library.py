"""The library's folders, named relative to the folder that holds them all, so none is shown as a server path.

The app narrows its picker to a folder without ever sending a client where the files
live: every folder is named relative to the deepest folder holding every record (the
root), and a name the client sends back is resolved against that root into the
ordinary `Filters.under` condition, so the store's filter machinery does the rest.
"""
from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass

from simsearch.errors import BadInputError


@dataclass(frozen=True)
class Folders:
    """The folders holding indexed files, each with how many records are in it or below it."""

    root: str  # the deepest folder holding every record: never sent to a client
    images: dict[str, int]  # folder relative to root ("" for the root itself) -> records in it or in its subfolders

    def under(self, folder: str) -> str:
        """The absolute folder a relative name stands for; a name the library lacks is a one-line error."""
        key = folder.strip().strip("/")
        if key not in self.images:
            raise BadInputError(f"no folder {folder!r} in this index; pick one of the folders the app lists")
        return posixpath.join(self.root, key) if key else self.root

    def listed(self) -> list[dict]:
        """[{folder, images}] for every folder below the root, in name order (what a folder menu offers)."""
        return [{"folder": name, "images": n} for name, n in self.images.items() if name]


def folders_of(direct: Mapping[str, int]) -> Folders:
    """`Folders` from the store's count of records directly in each folder (absolute paths)."""
    if not direct:
        return Folders("", {})
    root = posixpath.commonpath(list(direct))
    images: dict[str, int] = {}
    for folder, n in direct.items():
        relative = posixpath.relpath(folder, root)
        parts = [] if relative == "." else relative.split("/")
        for depth in range(len(parts) + 1):  # a folder counts the records of its subfolders too
            key = "/".join(parts[:depth])
            images[key] = images.get(key, 0) + n
    return Folders(root, dict(sorted(images.items())))
