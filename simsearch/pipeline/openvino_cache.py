"""OpenVINO's cache upkeep: cached models and compiled kernels nobody has used for long are deleted.

Each OpenVINO upgrade, weights file and thread count leaves its own files in the user
cache (ResNet50's converted model and kernels take ~190 MB), and nothing else removes
them. A model's folder is stamped whenever a process loads or compiles it, and once a day
while it runs; compiled kernels (OpenVINO's own blob files) are judged by their access and
modification times, so on a filesystem that records no access times a blob in use is
compiled again every STALE_AFTER_DAYS. Deleting anything still wanted costs a conversion
or a compile, never a failure (`OpenVINORunner._run` converts again).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

STALE_AFTER_DAYS = 60
USED_STAMP = "last_used"  # in a model's folder: touched at each use
TRASH_PREFIX = ".trash-"  # a folder is renamed to this first, so no process finds it half deleted


def mark_used(folder: Path) -> None:
    try:
        (folder / USED_STAMP).touch()
    except OSError:  # a read-only cache still serves; its files are just never pruned
        pass


def _last_used(path: Path) -> float:
    """When a model folder or compiled blob was last used, as far as its times tell."""
    stat = path.stat()
    if path.is_file():
        return max(stat.st_mtime, stat.st_atime)
    stamp = path / USED_STAMP
    return max(stat.st_mtime, stamp.stat().st_mtime if stamp.is_file() else 0.0)  # a folder being written is fresh


def prune_stale_cache(root: Path, keep: Path, now: float | None = None) -> list[Path]:
    """Delete model folders under `root`, and compiled blobs in `keep`, unused for STALE_AFTER_DAYS.

    `keep` (the model just loaded) is stamped first. A stale folder is renamed aside before
    it is deleted: the rename is atomic, and it fails (so the folder is skipped) where another
    process holds its files open on Windows. Returns what was deleted.
    """
    now = time.time() if now is None else now
    mark_used(keep)
    cutoff = now - STALE_AFTER_DAYS * 86400
    deleted: list[Path] = []
    try:
        folders = [p for p in root.iterdir() if p.is_dir() and p != keep]
        compiled = keep / "compiled"
        blobs = [p for p in compiled.iterdir() if p.is_file()] if compiled.is_dir() else []
    except OSError:
        return deleted
    for path in folders + blobs:
        try:
            if not path.name.startswith(TRASH_PREFIX) and _last_used(path) >= cutoff:
                continue
            if path.is_file():
                path.unlink()
            else:
                trash = path if path.name.startswith(TRASH_PREFIX) else root / f"{TRASH_PREFIX}{uuid.uuid4().hex}"
                if trash != path:
                    os.rename(path, trash)
                shutil.rmtree(trash)
            deleted.append(path)
        except OSError:  # in use, gone already (another process pruned it), or not ours to delete
            continue
    if deleted:
        log.info("openvino cache: deleted %d item(s) unused for %d days under %s", len(deleted), STALE_AFTER_DAYS, root)
    return deleted
