"""The store: SQLite holds records, boxes, predictions and the spec; shard files hold vectors and maps.

Every read and write of the database is a method here; no other module writes SQL.
A vector (float16) and, where something needs it, a feature map live in append-only
shard files (`shards.py`); SQLite holds each record's (shard, row). The rows are
on disk before the transaction that points at them commits, and that transaction
writes the record, its boxes, its positions and the shards' committed row counts
together, so a killed build can never leave a record without its vector or the
reverse. The FAISS file is derived from the vectors and stamped with the
`generation` it reflects, so a stale FAISS file is detected and rebuilt rather
than trusted.

Feature maps (~98% of a record's bytes when they lived in SQLite) are kept for
records with ground-truth boxes (the localizer trains on them), or for every record
when a build asks for it; others get their map again from the backbone when a head
needs it (`localizer.predict`).

Why a raw connection under sqlite-utils: crash safety rests on explicit
`BEGIN IMMEDIATE ... COMMIT` transactions of our own that span several tables
(sqlite-utils' `insert_all` commits per call), on WAL mode, and on `executemany`
for the per-batch inserts. sqlite-utils is used where it fits: table checks,
counts, column lists and dict rows (`db.query`).
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sqlite_utils

from simsearch.errors import IndexDamagedError, NotFoundError
from simsearch.records import GroundTruthObject, ImageRecord, ObjectMatch, Prediction, Record, Skipped, Tag, UNKNOWN
from simsearch.spec import IndexSpec
from simsearch.storage import layout
from simsearch.storage.shards import ShardFiles

if TYPE_CHECKING:
    from simsearch.retrieval.filters import Filters

log = logging.getLogger(__name__)


POSITION_TABLES = """
CREATE TABLE IF NOT EXISTS embeddings (
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    shard INTEGER NOT NULL,  -- the vector: float16, L2-normalised, row `row` of shards/vec-SHARD.f16
    row INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS feature_maps (
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    shard INTEGER NOT NULL,  -- float16, shape spec.embedder.feature_shape, in shards/map-SHARD.f16
    row INTEGER NOT NULL
);
"""

SCHEMA = POSITION_TABLES + """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is also the FAISS id
    path TEXT NOT NULL UNIQUE,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    split TEXT,
    source TEXT NOT NULL,
    dataset TEXT,
    added_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
CREATE INDEX IF NOT EXISTS images_dataset ON images(dataset);  -- the dataset filter: a lookup, not a scan
CREATE TABLE IF NOT EXISTS objects (
    id INTEGER PRIMARY KEY,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    label TEXT NOT NULL,
    xmin REAL NOT NULL, ymin REAL NOT NULL, xmax REAL NOT NULL, ymax REAL NOT NULL,
    difficult INTEGER NOT NULL DEFAULT 0,
    truncated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS objects_image ON objects(image_id);
CREATE INDEX IF NOT EXISTS objects_label ON objects(label);
CREATE TABLE IF NOT EXISTS shards (
    kind TEXT NOT NULL,  -- vec | map
    shard INTEGER NOT NULL,
    rows INTEGER NOT NULL,  -- rows committed; anything past them in the file was never pointed at
    PRIMARY KEY (kind, shard)
);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS predictions (
    image_id INTEGER PRIMARY KEY REFERENCES images(id) ON DELETE CASCADE,
    label TEXT,
    score REAL,
    xmin REAL, ymin REAL, xmax REAL, ymax REAL,  -- pixels of the original image
    head_version TEXT
);
CREATE TABLE IF NOT EXISTS boxes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: it is the objects index's FAISS id
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    object_id INTEGER REFERENCES objects(id) ON DELETE CASCADE,  -- its ground-truth box; NULL: the prediction
    label TEXT,
    score REAL NOT NULL,  -- 1.0 for a ground-truth box; the localizer's confidence for a predicted one
    xmin REAL NOT NULL, ymin REAL NOT NULL, xmax REAL NOT NULL, ymax REAL NOT NULL,  -- pixels
    shard INTEGER NOT NULL,  -- its vector: float16, pooled from the image's map, in shards/box-SHARD.f16
    row INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS boxes_image ON boxes(image_id);
CREATE INDEX IF NOT EXISTS boxes_object ON boxes(object_id);  -- a deleted object's box cascades by lookup, not scan
CREATE TABLE IF NOT EXISTS tags (  -- ImageNet classes of the whole image, from the embedding's own forward pass
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    label TEXT NOT NULL,
    score REAL NOT NULL  -- the classifier's probability
);
CREATE INDEX IF NOT EXISTS tags_image ON tags(image_id);
CREATE INDEX IF NOT EXISTS tags_label ON tags(label COLLATE NOCASE);  -- the tag filter: a lookup, any case
"""


@dataclass(frozen=True)
class _VectorKind:
    """Where one set of vectors lives: its shard files, its position table, its generation."""

    shard: str  # shard file kind
    table: str  # the table holding each vector's (shard, row)
    id_column: str  # the FAISS id
    generation_key: str  # meta key bumped whenever the set changes
    meta_prefix: str  # for this set's FAISS bookkeeping in meta


KINDS = {
    "images": _VectorKind("vec", "embeddings", "image_id", "generation", ""),
    "boxes": _VectorKind("box", "boxes", "id", "boxes_generation", "boxes_"),
}
POSITIONS = {"vec": ("embeddings", "image_id"), "map": ("feature_maps", "image_id"), "box": ("boxes", "id")}


@dataclass
class NewImage:
    """A decoded, embedded image ready to be committed."""

    record: ImageRecord
    sha256: str
    size: int
    mtime_ns: int
    width: int
    height: int
    vector: np.ndarray  # (D,) float32
    feature_map: np.ndarray | None = None  # (C, H, W); None: not kept (see the module docstring)
    prediction: Prediction | None = None  # the localizer's, when the index has a head: committed with the record
    # Box vectors (pooled from the map, `pipeline.box_vectors`), committed with the record:
    object_vectors: np.ndarray | None = None  # (len(record.objects), D), one per ground-truth box
    prediction_vector: np.ndarray | None = None  # (D,), the predicted box's
    tags: Sequence[Tag] = ()  # ImageNet tags from the embedding's forward pass, committed with the record
    # A dense head's further detections (scoring under `prediction`), each with its box vector (D,):
    # stored as predicted boxes beside the prediction's own, in the same transaction.
    detections: Sequence[tuple[Prediction, np.ndarray]] = ()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger "id" names no record


def damaged(path: Path, error: BaseException) -> IndexDamagedError:
    """The one message for a damaged database: what SQLite found, and how to recover."""
    found = str(error)
    try:  # a fresh connection: the failing one may be in any state
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as conn:
            found = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as e:
        found = f"{error}; quick_check: {e}"
    return IndexDamagedError(
        f"{path} is damaged ({found}). Its images are all still on disk: move the folder {path.parent} "
        f"away and run simsearch build-index again to rebuild it")


class _CheckedConnection(sqlite3.Connection):
    """Turns SQLite's 'not a database' / 'malformed' errors into IndexDamagedError with advice.

    Only the plain DatabaseError type means damage: its subclasses (a missing table,
    a constraint) are ordinary and pass through.
    """

    def execute(self, *args, **kwargs):
        try:
            return super().execute(*args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise self._translated(e) from e

    def executemany(self, *args, **kwargs):
        try:
            return super().executemany(*args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise self._translated(e) from e

    def executescript(self, *args, **kwargs):
        try:
            return super().executescript(*args, **kwargs)
        except sqlite3.DatabaseError as e:
            raise self._translated(e) from e

    def _translated(self, error: sqlite3.DatabaseError) -> BaseException:
        if type(error) is sqlite3.DatabaseError or "malformed" in str(error):
            return damaged(self.path, error)
        return error


class Store:
    """The SQLite side of one index folder."""

    def __init__(self, index_dir: str | os.PathLike, create: bool = False):
        self.dir = Path(index_dir)
        path = self.dir / layout.DB
        if not path.exists():
            if not create:
                raise NotFoundError(
                    f"{self.dir}: no index here. Build one first: simsearch build-index DATA --index {self.dir}"
                )
            self.dir.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: every write below runs in an explicit BEGIN ... COMMIT of our own.
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30,
                               factory=_CheckedConnection)
        conn.path = path
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # readers (query, serve) never block a running build
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL survives a killed process intact
            conn.execute("PRAGMA foreign_keys=ON")
            if create:
                conn.executescript(SCHEMA)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # reads the header: fails on garbage
            self.db = sqlite_utils.Database(conn)
            self._columns: list[str] | None = None
            present = self._ensure_tables()
            self._has_predictions = self._has_boxes = {"predictions", "boxes"} <= present
            self._has_tags = "tags" in present
            # Indexes made before vectors left SQLite keep them as blobs until a build upgrades them.
            self.legacy = "vector" in self.db["embeddings"].columns_dict
            self._shards: dict[str, ShardFiles] = {}
        except BaseException:
            conn.close()
            raise

    _LATER_TABLES = ("predictions", "boxes", "boxes_object", "images_dataset", "tags")

    def _ensure_tables(self) -> set[str]:
        """Indexes made before the predictions, boxes and tags tables (or the dataset index) joined the schema
        get them; returns the names of those now present.

        This is the one write a reader may make (empty tables and an index, once); in a
        read-only folder such an index simply reads as having no predictions, box vectors
        or tags, and filters by dataset by scanning, until a writer opens it.
        """
        present = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE name IN "
                                                 f"({', '.join('?' * len(self._LATER_TABLES))})",
                                                 self._LATER_TABLES)}
        if len(present) == len(self._LATER_TABLES):
            return present
        try:
            self.db.conn.executescript(SCHEMA)
        except sqlite3.OperationalError:  # read-only
            return present
        return set(self._LATER_TABLES)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.db.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: a process killed inside leaves the database as it was before."""
        conn = self.db.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ------------------------------------------------------------ meta and spec

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            self._set_meta(conn, key, value)

    def set_metas(self, values: dict[str, str]) -> None:
        """Several meta keys in one transaction: a reader sees all of them changed or none."""
        with self.transaction() as conn:
            for key, value in values.items():
                self._set_meta(conn, key, value)

    def _set_meta(self, conn: sqlite3.Connection, key: str, value: str) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", [key, value])

    @property
    def spec(self) -> IndexSpec | None:
        text = self.get_meta("spec")
        return IndexSpec.from_json(text) if text else None

    def save_spec(self, spec: IndexSpec) -> None:
        with self.transaction() as conn:
            self._set_meta(conn, "spec", spec.to_json())
        tmp = self.dir / (layout.SPEC + ".tmp")
        tmp.write_text(spec.to_json() + "\n")
        os.replace(tmp, self.dir / layout.SPEC)  # a human-readable copy; SQLite's is the one checked

    @property
    def finished(self) -> bool:
        """Whether a build got as far as the first FAISS file (the spec then names its type)."""
        spec = self.spec
        return spec is not None and spec.index_type is not None

    @property
    def generation(self) -> int:
        """Bumped by every change to the set of vectors; the FAISS file records the one it holds."""
        return int(self.get_meta("generation", "0"))

    def _bump(self, conn: sqlite3.Connection, key: str = "generation") -> None:
        value = conn.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
        self._set_meta(conn, key, str(int(value[0]) + 1 if value else 1))

    @property
    def boxes_generation(self) -> int:
        """Bumped by every change to the set of box vectors (the objects index's generation)."""
        return int(self.get_meta("boxes_generation", "0"))

    def vector_set(self, name: str) -> "VectorSet":
        """The images' vectors or the boxes' ("images" | "boxes"): what one FAISS index is built over."""
        if name not in KINDS:
            raise ValueError(f"no vector set {name!r}")
        return VectorSet(self, name)

    # ------------------------------------------------------------ writing

    def known_files(self) -> dict[str, tuple[int, str, int, int]]:
        """path -> (id, sha256, size, mtime_ns), to decide what a rebuild must embed again."""
        rows = self.db.execute("SELECT path, id, sha256, size, mtime_ns FROM images")
        return {path: (i, sha, size, mtime) for path, i, sha, size, mtime in rows}

    def add_images(self, items: Sequence[NewImage]) -> list[int]:
        """Insert (or replace, by path) a batch of embedded images in one transaction.

        Their vectors and kept maps are written to shard files first; the transaction
        then points at them, so a kill before it commits leaves only unreferenced rows.
        """
        if not items:
            return []
        self._refuse_legacy_write()
        vec_rows = self._append("vec", np.stack([np.asarray(it.vector) for it in items]))
        kept = [k for k, it in enumerate(items) if it.feature_map is not None]
        map_rows = self._append("map", np.stack([items[k].feature_map for k in kept])) if kept else []
        map_of = dict(zip(kept, map_rows))
        box_rows = self._append_box_vectors([self._box_vectors_of(it) for it in items])
        ids: list[int] = []
        boxes_changed = False  # a replaced file takes its old boxes with it
        with self.transaction() as conn:
            for k, item in enumerate(items):
                path = str(item.record.path)
                # A changed file: replace it whole (its old boxes go with it).
                boxes_changed |= conn.execute("DELETE FROM images WHERE path = ?", [path]).rowcount > 0
                cur = conn.execute(
                    "INSERT INTO images(path, sha256, size, mtime_ns, width, height, split, source, dataset, added_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [path, item.sha256, item.size, item.mtime_ns, item.width, item.height,
                     item.record.split, item.record.source, item.record.dataset, _now()],
                )
                image_id = int(cur.lastrowid)
                ids.append(image_id)
                object_ids = self._insert_objects(conn, image_id, item.record.objects)
                conn.execute("INSERT INTO embeddings(image_id, shard, row) VALUES (?, ?, ?)",
                             [image_id, *vec_rows[k]])
                if k in map_of:
                    conn.execute("INSERT INTO feature_maps(image_id, shard, row) VALUES (?, ?, ?)",
                                 [image_id, *map_of[k]])
                if item.prediction is not None:
                    p = item.prediction
                    conn.execute("INSERT INTO predictions(image_id, label, score, xmin, ymin, xmax, ymax, "
                                 "head_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                 [image_id, p.label, p.score, p.xmin, p.ymin, p.xmax, p.ymax, p.head_version])
                predicted = [item.prediction, *(p for p, _ in item.detections)] if item.prediction else []
                self._insert_boxes(conn, image_id, item.record.objects, object_ids, box_rows[k][0],
                                   predicted, box_rows[k][1])
                conn.executemany("INSERT INTO tags(image_id, label, score) VALUES (?, ?, ?)",
                                 [(image_id, t.label, float(t.score)) for t in item.tags])
                conn.execute("DELETE FROM skipped WHERE path = ?", [path])
            self._commit_rows(conn, "vec", vec_rows)
            self._commit_rows(conn, "map", map_rows)
            placed_boxes = [row for objects, pred in box_rows for row in objects + pred]
            self._commit_rows(conn, "box", placed_boxes)
            self._bump(conn)
            if boxes_changed or placed_boxes:  # images without boxes leave the objects index as it is
                self._bump(conn, "boxes_generation")
        return ids

    @staticmethod
    def _box_vectors_of(item: NewImage) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(object vectors, predicted boxes' vectors: the prediction's, then each further detection's)."""
        objects = item.object_vectors
        if objects is not None and len(objects) != len(item.record.objects):
            raise ValueError(f"{item.record.path}: {len(objects)} object vectors for {len(item.record.objects)} boxes")
        if item.prediction is None or item.prediction_vector is None:
            return objects, None
        return objects, np.stack([np.asarray(item.prediction_vector), *(np.asarray(v) for _, v in item.detections)])

    def _append_box_vectors(self, per_image: Sequence[tuple[np.ndarray | None, np.ndarray | None]]
                            ) -> list[tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
        """Write each image's (object vectors, predicted boxes' vectors) to box shards: (object rows, predicted rows)."""
        flat = [np.asarray(v, dtype=np.float32).reshape(-1, np.asarray(v).shape[-1])
                for pair in per_image for v in pair if v is not None and len(np.atleast_1d(v))]
        placed = self._append("box", np.concatenate(flat)) if flat else []
        out, at = [], 0
        for objects, prediction in per_image:
            n_obj = 0 if objects is None else len(objects)
            n_pred = 0 if prediction is None else len(prediction)
            out.append((placed[at:at + n_obj], placed[at + n_obj:at + n_obj + n_pred]))
            at += n_obj + n_pred
        return out

    @staticmethod
    def _insert_boxes(conn: sqlite3.Connection, image_id: int, objects: Sequence[GroundTruthObject],
                      object_ids: Sequence[int], object_rows: Sequence[tuple[int, int]],
                      predicted: Sequence[Prediction], predicted_rows: Sequence[tuple[int, int]]) -> None:
        """Point box rows at their vectors: ground-truth boxes (score 1), then the predicted ones, where vectors came."""
        rows = [(image_id, oid, o.label, 1.0, o.xmin, o.ymin, o.xmax, o.ymax, shard, row)
                for o, oid, (shard, row) in zip(objects, object_ids, object_rows)]
        rows += [(image_id, None, p.label, p.score, p.xmin, p.ymin, p.xmax, p.ymax, shard, row)
                 for p, (shard, row) in zip(predicted, predicted_rows)]
        conn.executemany("INSERT INTO boxes(image_id, object_id, label, score, xmin, ymin, xmax, ymax, shard, row)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)

    # ------------------------------------------------------------ shard files

    def shard_files(self, kind: str) -> ShardFiles:
        """The vector ("vec") or map ("map") shards of this index, shaped by its spec."""
        if kind not in self._shards:
            spec = self.spec
            if spec is None:
                raise NotFoundError(f"{self.dir}: index has no spec; rebuild it")
            shape = tuple(spec.embedder.feature_shape) if kind == "map" else (spec.embedder.dim,)
            self._shards[kind] = ShardFiles(self.dir / layout.SHARDS, kind, shape)
        return self._shards[kind]

    def _committed_rows(self, kind: str) -> dict[int, int]:
        return dict(self.db.execute("SELECT shard, rows FROM shards WHERE kind = ?", [kind]).fetchall())

    def _append(self, kind: str, rows: np.ndarray, fresh: bool = False,
                after: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
        """Write rows after the last committed one (or after `after`, written but not committed yet).

        A new shard starts when one is full, or at once when `fresh`. Returns each
        row's (shard, row); nothing points at them until `_commit_rows` runs in the
        transaction that inserts their positions.
        """
        files = self.shard_files(kind)
        committed = self._committed_rows(kind)
        last = max(committed, default=-1)
        shard, start = (last, committed[last]) if last >= 0 else (0, 0)
        if after:
            shard, start = after[-1][0], after[-1][1] + 1
        elif fresh and start:
            shard, start = max([last, *files.on_disk()]) + 1, 0
        placed: list[tuple[int, int]] = []
        done = 0
        while done < len(rows):
            if start >= files.rows_per_shard:
                shard, start = shard + 1, 0
            take = min(len(rows) - done, files.rows_per_shard - start)
            files.write(shard, start, rows[done:done + take])
            placed += [(shard, start + r) for r in range(take)]
            done, start = done + take, start + take
        return placed

    @staticmethod
    def _commit_rows(conn: sqlite3.Connection, kind: str, placed: Sequence[tuple[int, int]]) -> None:
        ends: dict[int, int] = {}
        for shard, row in placed:
            ends[shard] = max(ends.get(shard, 0), row + 1)
        conn.executemany("INSERT INTO shards(kind, shard, rows) VALUES (?, ?, ?) ON CONFLICT(kind, shard) "
                         "DO UPDATE SET rows = max(rows, excluded.rows)", [(kind, s, n) for s, n in ends.items()])

    def clean_shards(self) -> int:
        """Delete shard files no committed row lives in (a killed writer's, or retired by `compact`).

        Only under the writer lock: a writer that is appending owns the files it writes.
        """
        removed = 0
        for kind in POSITIONS:
            files = self.shard_files(kind)
            orphans = sorted(set(files.on_disk()) - set(self._committed_rows(kind)))
            files.remove(orphans)
            removed += len(orphans)
        return removed

    def compact(self, kind: str, min_dead: float = 0.5) -> int:
        """Copy live rows to fresh shards when at least `min_dead` of the rows belong to removed records.

        The old shards are retired in the same transaction that moves the positions,
        and deleted by the next writer's `clean_shards`, so a reader that read old
        positions just before can still open them. Returns the rows copied.
        """
        table, id_column = POSITIONS[kind]
        total = self.db.execute("SELECT coalesce(sum(rows), 0) FROM shards WHERE kind = ?", [kind]).fetchone()[0]
        live = self.count(table)
        if total == 0 or (total - live) / total < min_dead:
            return 0
        ids, positions = self._positions(table, None, id_column)
        data = self._gather(kind, positions) if len(ids) else np.zeros((0,))
        placed = self._append(kind, data, fresh=True) if len(ids) else []
        with self.transaction() as conn:
            conn.execute("DELETE FROM shards WHERE kind = ?", [kind])
            conn.executemany(f"UPDATE {table} SET shard = ?, row = ? WHERE {id_column} = ?",
                             [(s, r, int(i)) for (s, r), i in zip(placed, ids)])
            self._commit_rows(conn, kind, placed)
        log.info("compacted %s shards: %d live of %d rows", kind, live, total)
        return len(ids)

    def upgrade_layout(self) -> bool:
        """Move an older index's vector and map blobs out of SQLite into shards (no re-embedding).

        Under the writer lock. The shards are written first and the tables swapped in
        one transaction, so a kill at any point leaves the old layout whole or the new one.
        """
        if not self.legacy:
            return False
        conn = self.db.conn
        conn.executescript(SCHEMA)  # the shards table, for indexes that predate it
        moved: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}
        for kind, table, column, dtype in (("vec", "embeddings", "vector", np.float32),
                                           ("map", "feature_maps", "data", np.float16)):
            files = self.shard_files(kind)
            ids: list[int] = []
            placed: list[tuple[int, int]] = []
            rows = conn.execute(f"SELECT image_id, {column} FROM {table} ORDER BY image_id")
            while chunk := rows.fetchmany(1024):
                data = np.stack([np.frombuffer(blob, dtype=dtype).reshape(files.row_shape) for _, blob in chunk])
                ids += [r[0] for r in chunk]
                placed += self._append(kind, data, after=placed)
            moved[kind] = (ids, placed)
        with self.transaction() as tx:
            tx.execute("DROP TABLE embeddings")
            tx.execute("DROP TABLE feature_maps")
            for statement in filter(str.strip, POSITION_TABLES.split(";")):
                tx.execute(statement)
            for kind, table in (("vec", "embeddings"), ("map", "feature_maps")):
                ids, placed = moved[kind]
                tx.executemany(f"INSERT INTO {table}(image_id, shard, row) VALUES (?, ?, ?)",
                               [(i, s, r) for i, (s, r) in zip(ids, placed)])
                self._commit_rows(tx, kind, placed)
        self.legacy = False
        conn.execute("VACUUM")  # give the blobs' space back
        log.info("moved %d vectors and %d maps out of SQLite into %s", len(moved["vec"][0]), len(moved["map"][0]),
                 self.dir / layout.SHARDS)
        return True

    def _refuse_legacy_write(self) -> None:
        if self.legacy:
            raise IndexDamagedError(f"{self.dir} keeps its vectors in SQLite (an older layout); "
                                    f"run simsearch build-index to upgrade it first")

    def move_image(self, image_id: int, record: ImageRecord, size: int, mtime_ns: int,
                   object_vectors: np.ndarray | None = None) -> None:
        """A known file found at a new path (same bytes): keep its id and vector, take the new path and boxes.

        Its ground-truth boxes are replaced by the new annotation's, with their vectors
        (`object_vectors`, pooled from the kept map) when given.
        """
        path = str(record.path)
        rows = self._append_box_vectors([(object_vectors, None)])[0][0] if object_vectors is not None else []
        with self.transaction() as conn:
            conn.execute("UPDATE images SET path = ?, size = ?, mtime_ns = ?, split = ?, source = ?, dataset = ?"
                         " WHERE id = ?", [path, size, mtime_ns, record.split, record.source, record.dataset,
                                           int(image_id)])
            conn.execute("DELETE FROM objects WHERE image_id = ?", [int(image_id)])  # their box rows cascade
            object_ids = self._insert_objects(conn, int(image_id), record.objects)
            self._insert_boxes(conn, int(image_id), record.objects, object_ids, rows, [], [])
            self._commit_rows(conn, "box", rows)
            conn.execute("DELETE FROM skipped WHERE path = ?", [path])
            self._bump(conn, "boxes_generation")

    def paths_with_sha256(self, sha256: str) -> dict[str, int]:
        """path -> id of every record with these bytes."""
        return {r[0]: r[1] for r in self.db.execute("SELECT path, id FROM images WHERE sha256 = ?", [sha256])}

    @staticmethod
    def _insert_objects(conn: sqlite3.Connection, image_id: int, objects: Sequence[GroundTruthObject]) -> list[int]:
        """Insert ground-truth boxes; their ids, in order (their box vectors point at them)."""
        return [int(conn.execute(
            "INSERT INTO objects(image_id, label, xmin, ymin, xmax, ymax, difficult, truncated)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [image_id, o.label, o.xmin, o.ymin, o.xmax, o.ymax, int(o.difficult), int(o.truncated)]).lastrowid)
            for o in objects]

    def touch(self, path: str, size: int, mtime_ns: int) -> None:
        """A file whose timestamp changed but whose bytes did not: no need to embed it again."""
        with self.transaction() as conn:
            conn.execute("UPDATE images SET size = ?, mtime_ns = ? WHERE path = ?", [size, mtime_ns, path])

    def remove_images(self, ids: Iterable[int]) -> int:
        ids = list(ids)
        if not ids:
            return 0
        with self.transaction() as conn:
            had_boxes = self._has_boxes and bool(self._rows_for("SELECT 1 FROM boxes WHERE image_id IN ({}) LIMIT 1", ids))
            conn.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])  # boxes and maps cascade
            self._bump(conn)
            if had_boxes:
                self._bump(conn, "boxes_generation")
        return len(ids)

    def record_skipped(self, skipped: Sequence[Skipped]) -> None:
        if not skipped:
            return
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO skipped(path, reason, at) VALUES (?, ?, ?)",
                [(str(s.path), s.reason, _now()) for s in skipped],
            )

    # ------------------------------------------------------------ reading

    def has_rows(self, table: str) -> bool:
        return self.db[table].exists() and self.db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None

    def count(self, table: str = "images") -> int:
        return self.db[table].count if self.db[table].exists() else 0

    def vectors(self, ids: Sequence[int] | None = None, kind: str = "images") -> tuple[np.ndarray, np.ndarray]:
        """(ids, xb) in id order (all of a vector set, or those of `ids` that exist); xb is (n, dim) float32.

        `kind`: the images' vectors (ids are record ids) or the boxes' (ids are box ids).
        """
        if self.legacy and kind == "images":
            return self._legacy_vectors(ids)
        where = KINDS[kind]
        found, positions = self._positions(where.table, ids, where.id_column)
        if not len(found):
            return found, np.zeros((0, 0), dtype=np.float32)
        return found, self._gather(where.shard, positions)

    def _positions(self, table: str, ids: Sequence[int] | None,
                   id_column: str = "image_id") -> tuple[np.ndarray, np.ndarray]:
        """(ids, (n, 2) shard/row) of a position table, in id order."""
        sql = f"SELECT {id_column}, shard, row FROM {table}"
        rows = (self.db.execute(sql + f" ORDER BY {id_column}").fetchall() if ids is None
                else sorted(self._rows_for(sql + f" WHERE {id_column} IN ({{}})", ids)))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
        table_array = np.array(rows, dtype=np.int64)
        return table_array[:, 0], table_array[:, 1:]

    def _gather(self, kind: str, positions: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Rows at these (shard, row) positions, in their order."""
        files = self.shard_files(kind)
        out = np.empty((len(positions), *files.row_shape), dtype=dtype)
        for shard in np.unique(positions[:, 0]):
            mask = positions[:, 0] == shard
            out[mask] = files.read(int(shard), positions[mask, 1], dtype)
        return out

    def _legacy_vectors(self, ids: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
        if ids is None:
            rows = self.db.execute("SELECT image_id, vector FROM embeddings ORDER BY image_id").fetchall()
        else:
            rows = sorted(self._rows_for("SELECT image_id, vector FROM embeddings WHERE image_id IN ({})", ids))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        id_array = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        xb = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
        return id_array, xb

    def vector_snapshot(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(generation, ids, xb) read in one transaction: the vectors are exactly that generation's.

        A FAISS file stamped with a generation read before or after the vectors could
        claim to hold images it does not (a build committing in between).
        """
        with self._read_transaction():
            generation = self.generation
            ids, xb = self.vectors()
        return generation, ids, xb

    def id_snapshot(self, kind: str = "images") -> tuple[int, np.ndarray]:
        """(generation, ids with a vector) of a vector set, read in one transaction."""
        where = KINDS[kind]
        with self._read_transaction():
            generation = int(self.get_meta(where.generation_key, "0"))
            ids = np.fromiter((r[0] for r in self.db.execute(
                f"SELECT {where.id_column} FROM {where.table} ORDER BY {where.id_column}")), dtype=np.int64)
        return generation, ids

    @contextmanager
    def _read_transaction(self) -> Iterator[None]:
        conn = self.db.conn
        conn.execute("BEGIN")  # deferred: in WAL mode a consistent snapshot that blocks no writer
        try:
            yield
        finally:
            conn.execute("COMMIT")

    def feature_maps(self, ids: Sequence[int]) -> np.ndarray:
        """(n, C, H, W) float16 maps in the order of `ids`."""
        spec = self.spec
        if spec is None:
            raise NotFoundError(f"{self.dir}: index has no spec; rebuild it")
        shape = tuple(spec.embedder.feature_shape)
        if self.legacy:
            rows = dict(self._rows_for("SELECT image_id, data FROM feature_maps WHERE image_id IN ({})", ids))
            missing = [i for i in ids if i not in rows]
            if missing:
                raise NotFoundError(f"no feature map stored for records {missing[:5]}; rebuild the index")
            return np.stack([np.frombuffer(rows[i], dtype=np.float16).reshape(shape) for i in ids])
        found, positions = self._positions("feature_maps", ids)
        where = {int(i): k for k, i in enumerate(found)}
        missing = [i for i in ids if int(i) not in where]
        if missing:
            raise NotFoundError(f"no feature map kept for records {missing[:5]}; build with --keep-maps to keep them")
        maps = self._gather("map", positions, np.float16)
        return maps[[where[int(i)] for i in ids]] if len(ids) else np.zeros((0, *shape), dtype=np.float16)

    def _rows_for(self, sql: str, ids: Sequence[int]) -> list[tuple]:
        rows: list[tuple] = []
        ids = [int(i) for i in ids if 0 <= int(i) <= MAX_ID]
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            chunk = ids[start:start + 900]
            rows += self.db.execute(sql.format(",".join("?" * len(chunk))), chunk).fetchall()
        return rows

    def image(self, image_id: int) -> dict:
        rows = list(self.db.query("SELECT * FROM images WHERE id = ?", [int(image_id)])) \
            if 0 <= int(image_id) <= MAX_ID else []
        if not rows:
            raise NotFoundError(f"no record with id {image_id} in {self.dir}; `simsearch info` shows the ids")
        return rows[0]

    def images(self, ids: Sequence[int]) -> dict[int, dict]:
        cols = self._image_columns()
        return {row[0]: dict(zip(cols, row)) for row in self._rows_for(f"SELECT {', '.join(cols)} FROM images WHERE id IN ({{}})", ids)}

    def _image_columns(self) -> list[str]:
        # Read once: a PRAGMA per query was a measurable share of a by-id search.
        if self._columns is None:
            self._columns = [c.name for c in self.db["images"].columns]
        return self._columns

    def predictions(self, ids: Sequence[int]) -> dict[int, Prediction]:
        """The localizer's prediction per record id, where it has run."""
        if not self._has_predictions:
            return {}
        rows = self._rows_for("SELECT image_id, label, score, xmin, ymin, xmax, ymax, head_version FROM predictions "
                              "WHERE image_id IN ({})", ids)
        return {r[0]: Prediction(*r[1:]) for r in rows}

    def predicted_labels(self) -> dict[str, int]:
        """label -> number of records the localizer gave it; UNKNOWN is no class, so it is not listed."""
        if not self._has_predictions:
            return {}
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT label, count(*) FROM predictions WHERE label != ? GROUP BY label ORDER BY label", (UNKNOWN,))}

    def write_predictions(self, predictions: dict[int, Prediction],
                          vectors: dict[int, np.ndarray] | None = None,
                          detections: dict[int, Sequence[tuple[Prediction, np.ndarray]]] | None = None) -> None:
        """Insert or replace predictions, with their box vectors where given, all in one transaction.

        `predictions` is one row per image (a dense head's best detection);
        `detections` adds an image's further detections, each with its box vector,
        as predicted boxes beside it (only where the prediction's vector is given).
        An image's old predicted boxes, all of them, go with the replaced prediction.
        """
        vectors = vectors if vectors and not self.legacy else {}  # an old layout gets box vectors once upgraded
        detections = detections or {}
        order = [i for i in predictions if i in vectors]
        boxes_of = {i: [predictions[i], *(p for p, _ in detections.get(i, ()))] for i in order}
        stacked = [np.stack([np.asarray(vectors[i]), *(np.asarray(v) for _, v in detections.get(i, ()))])
                   for i in order]
        placed = self._append("box", np.concatenate(stacked)) if stacked else []
        row_of, at = {}, 0
        for i in order:
            row_of[i] = placed[at:at + len(boxes_of[i])]
            at += len(boxes_of[i])
        with self.transaction() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO predictions(image_id, label, score, xmin, ymin, xmax, ymax, head_version)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(i, p.label, p.score, p.xmin, p.ymin, p.xmax, p.ymax, p.head_version)
                 for i, p in predictions.items()])
            conn.executemany("DELETE FROM boxes WHERE image_id = ? AND object_id IS NULL",
                             [(int(i),) for i in predictions])
            for i in order:
                self._insert_boxes(conn, int(i), [], [], [], boxes_of[i], row_of[i])
            self._commit_rows(conn, "box", placed)
            self._bump(conn, "boxes_generation")

    def datasets(self) -> dict[str, int]:
        """dataset name -> number of records (what a dataset filter can name)."""
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT dataset, count(*) FROM images WHERE dataset IS NOT NULL GROUP BY dataset ORDER BY dataset")}

    def folders(self) -> dict[str, int]:
        """folder -> number of records directly in it (the paths build-index stored, cut at their last '/')."""
        return {r[0].rstrip("/") or "/": r[1] for r in self.db.execute(
            "SELECT rtrim(path, replace(path, '/', '')) AS folder, count(*) FROM images GROUP BY folder ORDER BY folder")}

    def ids_matching(self, filters: "Filters") -> np.ndarray:
        """Sorted int64 ids of the records that pass `filters` (see `retrieval.filters.Filters`).

        An image's boxes are its ground-truth objects (score 1.0: a drawn box is a fact)
        and its localizer prediction; with a box condition set, one box must meet all of
        them. The conditions are SQL fragments over `i` (images) and `b` (a box relation),
        so that the same filter can be applied to another relation of boxes.
        """
        if filters.tag is not None and not self._has_tags:
            return np.empty(0, dtype=np.int64)  # an old index opened read-only: nothing is tagged yet
        relation = self._IMAGE_BOXES if self._has_predictions else self._GROUND_TRUTH_BOXES
        sql, params = _matching_sql(filters, relation if filters.on_boxes else None)
        rows = self.db.execute(sql, params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    # (image_id, label, score, xmin, ymin, xmax, ymax) of every box an image has.
    _GROUND_TRUTH_BOXES = "SELECT image_id, label, 1.0 AS score, xmin, ymin, xmax, ymax FROM objects"
    # The prediction row, and every predicted box (a dense head stores many an image; older layouts kept none there).
    _IMAGE_BOXES = (_GROUND_TRUTH_BOXES + " UNION ALL SELECT image_id, label, score, xmin, ymin, xmax, ymax "
                    "FROM predictions WHERE label IS NOT NULL UNION ALL SELECT image_id, label, score, xmin, ymin, "
                    "xmax, ymax FROM boxes WHERE object_id IS NULL AND label IS NOT NULL")

    # ------------------------------------------------------------ boxes (the objects index)

    _BOX_COLUMNS = "b.id, b.image_id, b.label, b.score, b.xmin, b.ymin, b.xmax, b.ymax, b.object_id"

    @staticmethod
    def _box(row: tuple) -> ObjectMatch:
        return ObjectMatch(*row[:8], source="predicted" if row[8] is None else "truth")

    def boxes(self, box_ids: Sequence[int]) -> dict[int, ObjectMatch]:
        """Box id -> the box (ids removed since are missing)."""
        if not self._has_boxes:
            return {}
        rows = self._rows_for(f"SELECT {self._BOX_COLUMNS} FROM boxes b WHERE b.id IN ({{}})", box_ids)
        return {r[0]: self._box(r) for r in rows}

    def boxes_of_images(self, image_ids: Sequence[int]) -> dict[int, list[ObjectMatch]]:
        """Image id -> its boxes with vectors (ground truth first, then the predicted ones, best first)."""
        found: dict[int, list[ObjectMatch]] = {int(i): [] for i in image_ids}
        if not self._has_boxes:
            return found
        sql = (f"SELECT {self._BOX_COLUMNS} FROM boxes b WHERE b.image_id IN ({{}}) "
               "ORDER BY b.image_id, b.object_id IS NULL, b.id")
        for row in self._rows_for(sql, image_ids):
            found[row[1]].append(self._box(row))
        return found

    def box_ids_matching(self, filters: "Filters", exclude_images: Iterable[int] = ()) -> np.ndarray:
        """Sorted int64 ids of the boxes that pass `filters` themselves (class, area, score) in images that pass
        its file conditions, leaving out the boxes of `exclude_images` (the query's own copies)."""
        if not self._has_boxes or (filters.tag is not None and not self._has_tags):
            return np.zeros(0, dtype=np.int64)
        where, params = _filter_conditions(filters, True)
        skip = sorted({int(i) for i in exclude_images})
        if skip:
            where += f" AND b.image_id NOT IN ({', '.join('?' * len(skip))})"
            params = [*params, *skip]
        rows = self.db.execute(f"SELECT b.id FROM boxes b JOIN images i ON i.id = b.image_id WHERE {where} "
                               "ORDER BY b.id", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def objects_without_vectors(self) -> dict[int, list[int]]:
        """Image id -> ids of its ground-truth boxes that have no box vector yet (indexes made before them)."""
        if not self._has_boxes:
            return {}
        found: dict[int, list[int]] = {}
        for object_id, image_id in self.db.execute(
                "SELECT o.id, o.image_id FROM objects o LEFT JOIN boxes b ON b.object_id = o.id "
                "WHERE b.id IS NULL ORDER BY o.image_id, o.id"):
            found.setdefault(image_id, []).append(object_id)
        return found

    def predictions_without_vectors(self) -> list[int]:
        """Images whose prediction has no box vector yet."""
        if not self._has_boxes:
            return []
        return [r[0] for r in self.db.execute(
            "SELECT p.image_id FROM predictions p WHERE p.label IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM boxes b WHERE b.image_id = p.image_id AND b.object_id IS NULL) ORDER BY p.image_id")]

    def add_object_vectors(self, vectors: dict[int, np.ndarray]) -> None:
        """Box vectors for existing ground-truth boxes (object id -> vector), in one transaction."""
        if not vectors or self.legacy:
            return
        order = list(vectors)
        placed = self._append("box", np.stack([vectors[i] for i in order]))
        with self.transaction() as conn:
            conn.executemany(
                "INSERT INTO boxes(image_id, object_id, label, score, xmin, ymin, xmax, ymax, shard, row) "
                "SELECT image_id, id, label, 1.0, xmin, ymin, xmax, ymax, ?, ? FROM objects WHERE id = ?",
                [(shard, row, int(i)) for i, (shard, row) in zip(order, placed)])
            self._commit_rows(conn, "box", placed)
            self._bump(conn, "boxes_generation")

    def ids(self) -> list[int]:
        """Every record id, in order."""
        return [r[0] for r in self.db.execute("SELECT id FROM images ORDER BY id")]

    def ids_with_objects(self) -> list[int]:
        """Records with at least one ground-truth box: what the localizer trains on."""
        return [r[0] for r in self.db.execute("SELECT DISTINCT image_id FROM objects ORDER BY image_id")]

    def ids_with_feature_maps(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT image_id FROM feature_maps ORDER BY image_id")]

    def ids_with_feature_map(self, ids: Sequence[int]) -> set[int]:
        """Those of `ids` whose map is kept (the others get theirs from the backbone again)."""
        return {r[0] for r in self._rows_for("SELECT image_id FROM feature_maps WHERE image_id IN ({})", ids)}

    def ids_without_prediction(self) -> list[int]:
        """Records the localizer has not predicted for yet."""
        if not self._has_predictions:
            return self.ids()
        return [r[0] for r in self.db.execute(
            "SELECT i.id FROM images i LEFT JOIN predictions p ON p.image_id = i.id "
            "WHERE p.image_id IS NULL ORDER BY i.id")]

    def count_split(self, split: str) -> int:
        return self.db.execute("SELECT count(*) FROM images WHERE split = ?", [split]).fetchone()[0]

    def sizes(self, ids: Sequence[int]) -> dict[int, tuple[int, int]]:
        """id -> (width, height) of the original upright image."""
        sql = "SELECT id, width, height FROM images WHERE id IN ({})"
        return {r[0]: (r[1], r[2]) for r in self._rows_for(sql, ids)}

    def sha256_by_id(self) -> dict[int, str]:
        return {r[0]: r[1] for r in self.db.execute("SELECT id, sha256 FROM images")}

    def largest_duplicate_group(self) -> int:
        """How many records share the commonest sha256 (1 when every file is distinct)."""
        row = self.db.execute("SELECT max(c) FROM (SELECT count(*) AS c FROM images GROUP BY sha256)").fetchone()
        return row[0] or 1

    def records(self, ids: Sequence[int]) -> dict[int, Record]:
        """Records with their objects and prediction: two reads however many ids (on the query path)."""
        cols = "i.id, i.path, i.sha256, i.width, i.height, i.split, i.source, i.dataset"
        if self._has_predictions:
            sql = (f"SELECT {cols}, p.label, p.score, p.xmin, p.ymin, p.xmax, p.ymax, p.head_version FROM images i "
                   "LEFT JOIN predictions p ON p.image_id = i.id WHERE i.id IN ({})")
        else:
            sql = f"SELECT {cols} FROM images i WHERE i.id IN ({{}})"
        rows = self._rows_for(sql, ids)
        objects = self.objects([r[0] for r in rows])
        tags = self.tags([r[0] for r in rows])
        return {r[0]: Record(*r[:8], objects=objects.get(r[0], []),
                             prediction=Prediction(*r[8:]) if len(r) > 8 and r[8] is not None else None,
                             tags=tags.get(r[0], []))
                for r in rows}

    def tags(self, ids: Sequence[int]) -> dict[int, list[Tag]]:
        """Image id -> its ImageNet tags, most probable first."""
        found: dict[int, list[Tag]] = {int(i): [] for i in ids}
        if not self._has_tags:
            return found
        sql = "SELECT image_id, label, score FROM tags WHERE image_id IN ({}) ORDER BY image_id, score DESC"
        for image_id, label, score in self._rows_for(sql, ids):
            found[image_id].append(Tag(label, score))
        return found

    def tag_labels(self) -> dict[str, int]:
        """tag -> number of records holding it, commonest first (what a tag search can name)."""
        if not self._has_tags:
            return {}
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT label, count(DISTINCT image_id) AS n FROM tags GROUP BY label ORDER BY n DESC, label")}

    def ids_with_sha256(self, sha256: str) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT id FROM images WHERE sha256 = ?", [sha256])}

    def object_ids(self, ids: Sequence[int]) -> dict[int, list[int]]:
        """Image id -> the ids of its ground-truth boxes, in the order `objects` gives them."""
        found: dict[int, list[int]] = {int(i): [] for i in ids}
        for image_id, object_id in self._rows_for("SELECT image_id, id FROM objects WHERE image_id IN ({}) ORDER BY id",
                                                  ids):
            found[image_id].append(object_id)
        return found

    def objects(self, ids: Sequence[int]) -> dict[int, list[GroundTruthObject]]:
        found: dict[int, list[GroundTruthObject]] = {int(i): [] for i in ids}
        sql = ("SELECT image_id, label, xmin, ymin, xmax, ymax, difficult, truncated FROM objects "
               "WHERE image_id IN ({}) ORDER BY id")
        for image_id, label, *coords, difficult, truncated in self._rows_for(sql, ids):
            found[image_id].append(GroundTruthObject(label, *coords, difficult=bool(difficult), truncated=bool(truncated)))
        return found

    def skipped(self) -> list[dict]:
        return list(self.db.query("SELECT path, reason, at FROM skipped ORDER BY path"))

    def summary(self) -> dict:
        """Counts for `info`: what is in the index and what was left out."""
        by_source = {r["source"]: r["n"] for r in self.db.query("SELECT source, count(*) AS n FROM images GROUP BY source")}
        labels = {r["label"]: r["n"] for r in self.db.query(
            "SELECT label, count(*) AS n FROM objects GROUP BY label ORDER BY n DESC, label")}
        return {
            "images": self.count("images"),
            "objects": self.count("objects"),
            "skipped": self.count("skipped"),
            "by_source": by_source,
            "labels": labels,
            "generation": self.generation,
        }


class VectorSet:
    """One set of vectors and what its FAISS index needs of the store: the images', or the boxes'.

    The images' set is the store's own (`Store.vectors`, `Store.spec`); the boxes' keep
    their generation, FAISS bookkeeping and index spec under their own meta keys, so
    one set of FAISS code (`layout`) serves both.
    """

    def __init__(self, store: Store, name: str):
        self.store, self.name, self.kind = store, name, KINDS[name]

    @property
    def dir(self) -> Path:
        return self.store.dir

    @property
    def generation(self) -> int:
        return int(self.store.get_meta(self.kind.generation_key, "0"))

    def count(self) -> int:
        return self.store.count(self.kind.table)

    def any(self) -> bool:
        """Whether the set holds a vector at all (a lookup, where `count` reads the whole table)."""
        return self.store.has_rows(self.kind.table)

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        return self.store.get_meta(self.kind.meta_prefix + key, default)

    def set_meta(self, key: str, value: str) -> None:
        self.store.set_meta(self.kind.meta_prefix + key, value)

    @property
    def spec(self) -> IndexSpec | None:
        if self.name == "images":
            return self.store.spec
        text = self.get_meta("spec")
        return IndexSpec.from_json(text) if text else None

    def save_spec(self, spec: IndexSpec) -> None:
        if self.name == "images":
            self.store.save_spec(spec)
        else:
            self.set_meta("spec", spec.to_json())

    def vectors(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, xb) in id order, as `Store.vectors`."""
        return self.store.vectors(ids, self.name)

    def id_snapshot(self) -> tuple[int, np.ndarray]:
        """(generation, ids) read in one transaction."""
        return self.store.id_snapshot(self.name)


def _matching_sql(filters: "Filters", boxes: str | None) -> tuple[str, list]:
    """SELECT of the ids of images (`i`) passing `filters`, over the box relation `boxes` (`b`) when one is given.

    `boxes` is a subquery or table with columns (image_id, label, score, xmin, ymin, xmax,
    ymax); the ids are distinct and sorted.
    """
    where, params = _filter_conditions(filters, boxes is not None)
    if boxes is None:
        return f"SELECT i.id FROM images i WHERE {where} ORDER BY i.id", params
    return (f"SELECT DISTINCT i.id FROM images i JOIN ({boxes}) b ON b.image_id = i.id "
            f"WHERE {where} ORDER BY i.id"), params


def _filter_conditions(filters: "Filters", with_boxes: bool) -> tuple[str, list]:
    """(WHERE clause, params) of `filters` over `i` (images: id, path, dataset, width, height, and its tags)
    and `b` (one box).

    A box relation whose rows must each pass on their own (object vectors: one row a box)
    uses the same clause with `b` as that table, joined to its image as `i`.
    """
    clauses: list[str] = []
    params: list = []
    if filters.under:
        clauses.append("(" + " OR ".join(_under(f, params) for f in filters.under) + ")")
    for folder in filters.not_under:
        clauses.append(f"NOT {_under(folder, params)}")
    if filters.dataset:
        clauses.append(f"i.dataset IN ({', '.join('?' * len(filters.dataset))})")
        params += filters.dataset
    if filters.not_dataset:
        clauses.append(f"(i.dataset IS NULL OR i.dataset NOT IN ({', '.join('?' * len(filters.not_dataset))}))")
        params += filters.not_dataset
    if filters.tag is not None:
        clauses.append("i.id IN (SELECT image_id FROM tags WHERE label = ? COLLATE NOCASE)")
        params.append(filters.tag)
    if filters.name is not None:  # the name after the last '/': instr, so '%' and '_' are plain text
        clauses.append("instr(lower(substr(i.path, length(rtrim(i.path, replace(i.path, '/', ''))) + 1)), lower(?)) > 0")
        params.append(filters.name)
    if filters.orientation is not None:
        clauses.append({"landscape": "i.width > i.height", "portrait": "i.height > i.width",
                        "square": "i.width = i.height"}[filters.orientation])
    if with_boxes:
        if filters.label is not None:
            clauses.append("b.label = ?")
            params.append(filters.label)
        if filters.min_score is not None:
            clauses.append("b.score >= ?")
            params.append(filters.min_score)
        if filters.min_box_area is not None:  # multiplied out: no division by a zero-sized image
            clauses.append("(b.xmax - b.xmin) * (b.ymax - b.ymin) >= ? * i.width * i.height")
            params.append(filters.min_box_area)
    return " AND ".join(clauses) or "1", params


def _under(folder: str, params: list) -> str:
    """`i.path` is `folder` or below it: a range of the path index, [folder/, folder0), no scan and no
    LIKE wildcards to escape ('0' follows '/'), so that /a/b does not take in /a/bc."""
    prefix = folder.rstrip("/") + "/"
    params += [folder, prefix, prefix[:-1] + "0"]
    return "(i.path = ? OR (i.path >= ? AND i.path < ?))"
