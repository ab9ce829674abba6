"""Duplicates: groups of files an index holds more than once, exact (same sha256) or near (cosine >= threshold).

A photo library collects copies: the same file saved twice, a resized or re-compressed
export, a mirrored or recoloured edit. `find_duplicates` groups them the way
imagededup does (exact hashes, plus CNN cosine >= ~0.9), and says which copy to keep:
the largest resolution, then the oldest file, then the largest file.

How it scales: no O(n^2) loop. The stored vectors are read in batches and each batch
is searched with FAISS (`Searcher.knn`, the index's own search with its re-ranking)
for K neighbours; a row whose K-th neighbour still clears the threshold is searched
again twice as deep, so a record with many copies loses none and the rest cost K. Edges
(pairs at or above the threshold, and every pair of one sha256) are O(n K) at most.

Grouping is by keeper, not by chains: records are taken in keep order (best copy
first), and each one not yet placed that has an edge opens a group of itself and its
neighbours not yet placed. So every member scores at or above the threshold against the
copy kept, and a run of look-alikes (A ~ B ~ C with A and C apart) never merges into
one group whose ends are unrelated.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from simsearch.errors import BadInputError
from simsearch.records import Record
from simsearch.retrieval.contents import NEAR_DUPLICATE

if TYPE_CHECKING:
    from simsearch.retrieval.searcher import Searcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DuplicatesConfig:
    """What `find_duplicates` groups and how it searches."""

    threshold: float = NEAR_DUPLICATE  # cosine at or above which two different files are near-duplicates
    exact_only: bool = False  # group identical files (sha256) only: no vector search at all
    k: int = 16  # neighbours first asked for each record; doubled for rows whose last one still clears the threshold
    batch: int = 1024  # stored vectors read and searched at a time (memory: batch x dim floats)
    quiet: bool = True  # no progress bar on stderr


@dataclass
class Copy:
    """One file of a duplicate group, with what the choice of the one to keep looks at."""

    record: Record
    bytes: int  # file size when it was indexed
    mtime_ns: int  # its modification time then: "oldest" means smallest
    role: str  # "keep", "exact" (same bytes as the kept copy) or "near"
    score: float  # cosine to the kept copy (1.0 for itself and for exact copies)

    @property
    def pixels(self) -> int:
        return self.record.width * self.record.height

    def modified(self) -> str:
        """The file's modification time, UTC, to the second: what people compare to say which is older."""
        return datetime.fromtimestamp(self.mtime_ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")

    def to_json(self) -> dict:
        return {"role": self.role, "id": self.record.id, "path": self.record.path, "score": self.score,
                "width": self.record.width, "height": self.record.height, "bytes": self.bytes,
                "modified": self.modified(), "sha256": self.record.sha256}


@dataclass
class Group:
    """Files holding one picture: the copy to keep first, then the others, closest first."""

    number: int  # 1-based, largest group first
    copies: list[Copy]

    @property
    def keep(self) -> Copy:
        return self.copies[0]

    @property
    def kind(self) -> str:
        """"exact" when every file has the same bytes, "near" when none does, else "mixed"."""
        roles = {c.role for c in self.copies[1:]}
        return roles.pop() if len(roles) == 1 else "mixed"

    @property
    def reclaimable(self) -> int:
        """Bytes freed by removing every copy but the one kept."""
        return sum(c.bytes for c in self.copies[1:])

    def to_json(self) -> dict:
        return {"group": self.number, "kind": self.kind, "keep": self.keep.record.id,
                "reclaimable_bytes": self.reclaimable, "copies": [c.to_json() for c in self.copies]}


@dataclass
class DuplicatesReport:
    """Every duplicate group of an index, and how they were found."""

    index: str
    records: int  # records searched
    threshold: float | None  # None: exact copies only
    groups: list[Group] = field(default_factory=list)
    searched_depth: int = 0  # the deepest neighbour list any record needed
    seconds: float = 0.0

    @property
    def redundant(self) -> int:
        """Files that could go: every copy but the one kept, in every group."""
        return sum(len(g.copies) - 1 for g in self.groups)

    def summary(self) -> dict:
        exact = sum(1 for g in self.groups if g.kind == "exact")
        return {"index": self.index, "records": self.records, "threshold": self.threshold,
                "groups": len(self.groups), "exact_groups": exact, "near_or_mixed_groups": len(self.groups) - exact,
                "redundant_files": self.redundant, "reclaimable_bytes": sum(g.reclaimable for g in self.groups),
                "searched_depth": self.searched_depth, "seconds": self.seconds}

    def text(self) -> str:
        """'3 groups (2 exact, 1 near) among 120 records: 4 files could go (1.2 MB)', for stderr."""
        s = self.summary()
        return (f"{s['groups']} duplicate groups ({s['exact_groups']} exact, {s['near_or_mixed_groups']} near) among "
                f"{s['records']} records: {s['redundant_files']} files could go ({human_bytes(s['reclaimable_bytes'])})")


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ------------------------------------------------------------ pure functions


def keep_order(copies: list[Copy]) -> list[Copy]:
    """Best copy first: largest resolution, then oldest file, then largest file, then lowest id (stable)."""
    return sorted(copies, key=lambda c: (-c.pixels, c.mtime_ns, -c.bytes, c.record.id))


def group_by_keeper(order: list[int], edges: dict[int, dict[int, float]],
                    twins: dict[int, list[int]] | None = None) -> list[list[int]]:
    """Groups of ids: each id in `order` not yet placed that has a neighbour not yet placed opens a group of them.

    `order` is keep order (best first); `edges[a][b]` is the score of a pair at or above the
    threshold (symmetric); `twins[a]` the ids holding a's very bytes (linked whatever their
    score, without m^2 edges for m copies of one file). Every member of a group is a twin
    or an edge of its first id.
    """
    twins = twins or {}
    placed: set[int] = set()
    groups = []
    for leader in order:
        if leader in placed:
            continue
        theirs = edges.get(leader, {})
        same = {b for b in twins.get(leader, ()) if b not in placed and b != leader}
        members = same | {b for b in theirs if b not in placed}
        if not members:
            continue
        group = [leader, *sorted(members, key=lambda b: (-1.0 if b in same else -theirs[b], b))]
        placed.update(group)
        groups.append(group)
    return groups


def near_edges(searcher: "Searcher", ids: np.ndarray, threshold: float, k: int, batch: int,
               progress=None) -> tuple[dict[int, dict[int, float]], int]:
    """(edges, deepest k): every pair of stored records scoring >= threshold, found by batched kNN.

    Each batch of stored vectors is searched `k` deep; rows whose last neighbour still
    scores >= threshold are searched again twice as deep until it does not (or the
    index is exhausted), so the pairs found are all the index's search finds.
    """
    edges: dict[int, dict[int, float]] = defaultdict(dict)
    ntotal = searcher.index.ntotal
    deepest = 0
    for start in range(0, len(ids), batch):
        found, xq = searcher.store.vectors(ids[start:start + batch].tolist())
        depth = min(ntotal, k)
        rows = np.arange(len(found))
        while len(rows):
            scores, hits = searcher.knn(xq[rows], depth)
            deepest = max(deepest, depth)
            # Only the pairs that clear the threshold reach Python: O(pairs found), not O(rows x depth).
            queried = found[rows][:, None]
            for r, c in zip(*np.nonzero((hits >= 0) & (scores >= threshold) & (hits != queried))):
                a, b, s = int(queried[r, 0]), int(hits[r, c]), float(scores[r, c])
                edges[a][b] = edges[b][a] = max(s, edges[a].get(b, -1.0))
            if depth >= ntotal:
                break
            rows = rows[scores[:, -1] >= threshold]  # their list may go on past depth: look deeper
            depth = min(ntotal, depth * 2)
        if progress is not None:
            progress(len(found))
    return edges, deepest


# ------------------------------------------------------------ an index's duplicates


def find_duplicates(index_dir: str | os.PathLike, config: DuplicatesConfig = DuplicatesConfig()) -> DuplicatesReport:
    """Every group of exact and near-duplicate files in an index, the copy to keep first."""
    from simsearch.retrieval.searcher import Searcher

    if not config.exact_only and not 0.0 < config.threshold <= 1.0:
        raise BadInputError(f"--threshold {config.threshold:g}: give a cosine score in (0, 1], e.g. 0.9")
    if config.k < 2 or config.batch < 1:
        raise BadInputError("k must be at least 2 and batch at least 1")
    started = time.perf_counter()
    with Searcher(index_dir) as searcher:
        _, ids = searcher.store.id_snapshot()
        report = DuplicatesReport(str(index_dir), len(ids), None if config.exact_only else config.threshold)
        edges: dict[int, dict[int, float]] = {}
        by_sha: dict[str, list[int]] = defaultdict(list)
        for image_id, sha in searcher.store.sha256_by_id().items():
            by_sha[sha].append(image_id)
        # Identical bytes are duplicates whatever their vectors say.
        shared = [same for same in by_sha.values() if len(same) > 1]
        if not config.exact_only and len(ids) > 1:
            bar = _bar(len(ids), config.quiet)
            try:
                found, report.searched_depth = near_edges(searcher, ids, config.threshold, config.k, config.batch,
                                                          bar.update if bar is not None else None)
            finally:
                if bar is not None:
                    bar.close()
            edges = found
        linked = sorted({i for same in shared for i in same} | {a for a in edges if edges[a]})
        records = searcher.store.records(linked)
        files = searcher.store.images(linked)
        copies = {i: Copy(records[i], int(files[i]["size"]), int(files[i]["mtime_ns"]), "near", 1.0)
                  for i in linked if i in records and i in files}
        order = [c.record.id for c in keep_order(list(copies.values()))]
        edges = {a: {b: s for b, s in theirs.items() if b in copies} for a, theirs in edges.items() if a in copies}
        kept = [[b for b in same if b in copies] for same in shared]  # one list per file, shared by its copies
        twins = {i: same for same in kept for i in same}
        groups = group_by_keeper(order, edges, twins)
        vectors = _vectors(searcher, [i for g in groups for i in g]) if groups and not config.exact_only else {}
    report.groups = [_group(g, copies, edges, vectors) for g in groups]
    report.groups.sort(key=lambda g: (-len(g.copies), -g.reclaimable, g.keep.record.id))
    for number, g in enumerate(report.groups, 1):
        g.number = number
    report.seconds = round(time.perf_counter() - started, 2)
    log.info("duplicates: %d records, %d groups, depth %d, %.2fs", report.records, len(report.groups),
             report.searched_depth, report.seconds)
    return report


def _vectors(searcher: "Searcher", ids: list[int]) -> dict[int, np.ndarray]:
    found, xb = searcher.store.vectors(ids)
    return {int(i): v for i, v in zip(found, xb)}


def _group(members: list[int], copies: dict[int, Copy], edges: dict[int, dict[int, float]],
           vectors: dict[int, np.ndarray]) -> Group:
    """A Group of these ids (keeper first), each scored against the keeper by its stored vectors."""
    keeper = copies[members[0]]
    out = [Copy(keeper.record, keeper.bytes, keeper.mtime_ns, "keep", 1.0)]
    for i in members[1:]:
        c = copies[i]
        exact = c.record.sha256 == keeper.record.sha256
        if exact:
            score = 1.0
        elif i in vectors and keeper.record.id in vectors:
            score = round(float(vectors[i] @ vectors[keeper.record.id]), 6)
        else:
            score = round(edges.get(keeper.record.id, {}).get(i, 1.0), 6)
        out.append(Copy(c.record, c.bytes, c.mtime_ns, "exact" if exact else "near", score))
    out[1:] = sorted(out[1:], key=lambda c: (c.role != "exact", -c.score, c.record.id))
    return Group(0, out)


def _bar(total: int, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="duplicates", unit="img", file=sys.stderr, dynamic_ncols=True)
