"""Filters applied inside the search (issue 12, part 3): k results whenever k records pass, however rare they are.

The records that pass each filter are made the ones least like the query: a pool of
nearest neighbours filtered afterwards (what search did before) never reaches them.
Synthetic vectors go through the real store; the index is exact (Flat) or an IVF over
fast-scan PQ codes with a delta, and each is searched in every way `search_allowed`
can take: exact scoring of few allowed ids, FAISS id selectors with an exact fallback
for rows that came back short, and selectors that widen to every list instead.
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import BadInputError
from simsearch.records import GroundTruthObject, ImageRecord, Prediction
from simsearch.retrieval.filters import Filters
from simsearch.retrieval.searcher import Searcher
from simsearch.spec import EmbedderSpec, IndexSpec
from simsearch.storage import faiss_index, layout
from simsearch.storage.store import NewImage, Store
from vectors import clustered_vectors

faiss = pytest.importorskip("faiss")

DIM = 32
SPEC = EmbedderSpec("synthetic", "none", "0" * 64, DIM, (1, 1, 1))
N = 2000
DELTA = 150  # records added after the IVF was trained: they live in its delta file
SIDE = 100  # every synthetic image is 100x100 pixels
SMALL = (10, 10, 20, 20)  # a box of 1% of the image
LARGE = (0, 0, 80, 75)  # 60%

# Which slots of the "far" list (records least like the query, farthest first) get what.
RARE_GT = [0, 1, 2]  # ground-truth class "rare", small box
RARE_PRED = [3, 4, 5]  # predicted class "rare2" (score 0.3)
CONFIDENT = [6, 7, 8]  # predicted "common" with score 0.95
LARGE_PRED = [9, 10, 11]  # predicted "common" with a large box
SPLIT_BOX = [12]  # ground truth "rare3" small + predicted "common" large: no one box is both
RARE3_LARGE = [13]  # ground truth "rare3" large
UNDER_A = [14, 15, 16]  # files under .../a/
UNDER_AB = [17, 18, 19]  # under .../ab/ (must not pass --under .../a)
UNDER_A_C = [20]  # under .../a_c/ (a LIKE wildcard in the folder name)
UNDER_ABC = [21]  # under .../abc/ (what a_c would match as a LIKE pattern)
RARE_SET = [22, 23, 24]  # dataset "rare-set"
FAR = 26


def _query() -> np.ndarray:
    return clustered_vectors(1, DIM, seed=99)[0]


def _layout(root: Path):
    """(vectors, records, far slot -> row) of N synthetic images; `far` rows are those least like the query."""
    xb = clustered_vectors(N, DIM, seed=21)
    far = np.argsort(xb @ _query(), kind="stable")[:FAR]  # least similar first
    slot_of = {int(row): slot for slot, row in enumerate(far)}
    records = []
    for row in range(N):
        slot = slot_of.get(row)
        folder, dataset, objects = "main", "main", []
        pred = Prediction("common", 0.3, *SMALL)
        if slot in RARE_GT:
            objects = [GroundTruthObject("rare", *SMALL)]
        if slot in RARE_PRED:
            pred = Prediction("rare2", 0.3, *SMALL)
        if slot in CONFIDENT:
            pred = Prediction("common", 0.95, *SMALL)
        if slot in LARGE_PRED:
            pred = Prediction("common", 0.3, *LARGE)
        if slot in SPLIT_BOX:
            objects, pred = [GroundTruthObject("rare3", *SMALL)], Prediction("common", 0.3, *LARGE)
        if slot in RARE3_LARGE:
            objects = [GroundTruthObject("rare3", *LARGE)]
        for slots, name in ((UNDER_A, "a"), (UNDER_AB, "ab"), (UNDER_A_C, "a_c"), (UNDER_ABC, "abc")):
            if slot in slots:
                folder = name
        if slot in RARE_SET:
            dataset = "rare-set"
        records.append((ImageRecord(root / folder / f"{row:06d}.jpg", "folder", dataset, None, objects), pred))
    return xb, records, far


@pytest.fixture(scope="module", params=["Flat", "IVF+delta"])
def index(request, tmp_path_factory):
    """(index folder, far rows -> ids): the N records, in an exact index or an IVF-PQ whose delta holds some far ones."""
    tmp = tmp_path_factory.mktemp("filters")
    root = (tmp / "photos").resolve()
    xb, records, far = _layout(root)
    # Half the far records go to the IVF's delta, the other half to its file.
    late = set(far[1::2].tolist())
    rest = [r for r in range(N) if r not in late]
    order = rest[:N - DELTA] + sorted(late) + rest[N - DELTA:]
    index_dir = tmp / "idx"
    id_of = {}
    with Store(index_dir, create=True) as store:
        store.save_spec(IndexSpec(SPEC, index_type=None))

        def add(rows):
            items = [NewImage(records[r][0], f"{r:064x}", 1, 1, SIDE, SIDE, xb[r],
                              prediction=records[r][1]) for r in rows]
            id_of.update(zip(rows, store.add_images(items)))

        if request.param == "Flat":
            add(order)
            layout.sync_faiss(store, SPEC, "Flat")
        else:
            add(order[:N - DELTA])
            layout.sync_faiss(store, SPEC, "IVF16,PQ8x4fs")
            add(order[N - DELTA:])
            assert layout.sync_faiss(store, SPEC).action == "updated"
            assert list(index_dir.glob("index.delta-*.faiss")), "the test needs an IVF with a delta"
            store.save_spec(replace(store.spec, nprobe=2))  # narrow: far records lie outside the probed lists
    return index_dir, [id_of[int(r)] for r in far], request.param


@pytest.fixture(params=["exact", "selector", "widen"])
def way(request, monkeypatch):
    """Each path of search_allowed: exact scoring of the allowed ids; id selectors (short rows scored
    exactly); id selectors whose short rows search every list again."""
    monkeypatch.setattr(faiss_index, "EXACT_ALLOWED", N if request.param == "exact" else 0)
    if request.param == "widen":
        monkeypatch.setattr(faiss_index, "EXACT_FALLBACK_MAX", 0)
    return request.param


def _ids(far_ids, slots):
    return {far_ids[s] for s in slots}


CASES = {
    "class in ground truth": (dict(label="rare"), RARE_GT),
    "class predicted": (dict(label="rare2"), RARE_PRED),
    "min score (drawn boxes count 1.0)": (dict(min_score=0.9), CONFIDENT + RARE_GT + SPLIT_BOX + RARE3_LARGE),
    "min box area": (dict(min_box_area=0.5), LARGE_PRED + SPLIT_BOX + RARE3_LARGE),
    "class and area on one box": (dict(label="rare3", min_box_area=0.5), RARE3_LARGE),
    "under a folder, not its sibling ab": (dict(under=("a",)), UNDER_A),
    "under a folder with a LIKE wildcard": (dict(under=("a_c",)), UNDER_A_C),
    "not under": (dict(not_under=("main",)), UNDER_A + UNDER_AB + UNDER_A_C + UNDER_ABC),
    "dataset": (dict(dataset=("rare-set",)), RARE_SET),
    "not dataset": (dict(not_dataset=("main",)), RARE_SET),
    "two folders": (dict(under=("a", "abc")), UNDER_A + UNDER_ABC),
}


def _filters(kwargs: dict, root: Path) -> Filters:
    kwargs = dict(kwargs)
    for key in ("under", "not_under"):
        if key in kwargs:
            kwargs[key] = tuple(str(root / f) for f in kwargs[key])
    return Filters(**kwargs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_filter_returns_every_match_the_old_pool_missed(index, way, case):
    index_dir, far_ids, _ = index
    kwargs, slots = CASES[case]
    filters = _filters(kwargs, index_dir.parent / "photos")
    wanted = _ids(far_ids, slots)
    with Searcher(index_dir) as searcher:
        assert set(searcher.store.ids_matching(filters).tolist()) == wanted
        found = searcher.search_vector(_query()[None], len(wanted), filters=filters)
        assert {n.id for n in found} == wanted  # all of them, though they are the least similar of all
        more = searcher.search_vector(_query()[None], len(wanted) + 5, filters=filters)
        assert {n.id for n in more} == wanted  # no more than pass
        scores = [n.score for n in more]
        assert scores == sorted(scores, reverse=True)
        # What the search did before: a pool of 500 nearest, filtered afterwards, found none of them.
        _, pool = searcher.knn(_query()[None], 500)
        assert not wanted & set(pool[0].tolist())


def test_a_broad_filter_fills_k_with_the_best_that_pass(index, way):
    index_dir, far_ids, kind = index
    filters = Filters(under=(str(index_dir.parent / "photos" / "main"),), min_score=0.2)
    with Searcher(index_dir) as searcher:
        allowed = searcher.store.ids_matching(filters)
        assert len(allowed) == N - 8  # all but those under a, ab, a_c, abc
        found = searcher.search_vector(_query()[None], 20, filters=filters)
        assert len(found) == 20 and {n.id for n in found} <= set(allowed.tolist())
        ids, xb = searcher.store.vectors(allowed)
        exact = ids[np.argsort(-(xb @ _query()))[:20]]
        overlap = len({n.id for n in found} & set(exact.tolist())) / 20
        if kind == "Flat" or way == "exact":
            assert overlap == 1.0
        else:  # as approximate as the same IVF unfiltered (its breadth is narrowed on purpose here)
            all_ids, all_xb = searcher.store.vectors()
            unfiltered = set(searcher.knn(_query()[None], 20)[1][0].tolist())
            assert overlap >= len(unfiltered & set(all_ids[np.argsort(-(all_xb @ _query()))[:20]].tolist())) / 20 - 0.1


def test_exclusions_are_honoured_and_k_still_fills(index, way):
    index_dir, far_ids, _ = index
    filters = Filters(label="rare")
    rare = sorted(_ids(far_ids, RARE_GT))
    with Searcher(index_dir) as searcher:
        result = searcher.search(rare[0], 5, filters)  # a record's own copies are no answer
        assert {n.id for n in result.neighbours} == set(rare[1:])
        broad = Filters(dataset=("main",))
        best = [n.id for n in searcher.search_vector(_query()[None], 5, filters=broad)]
        again = searcher.search_vector(_query()[None], 5, exclude=set(best[:2]), filters=broad)
        assert len(again) == 5 and not set(best[:2]) & {n.id for n in again}
        assert searcher.search_vector(_query()[None], 5, exclude=set(rare), filters=filters) == []


def test_no_match_is_an_empty_list_not_an_error(index):
    index_dir, _, _ = index
    with Searcher(index_dir) as searcher:
        assert searcher.search_vector(_query()[None], 5, filters=Filters(label="no-such-class")) == []


def test_an_inactive_filter_searches_everything(index):
    index_dir, _, _ = index
    with Searcher(index_dir) as searcher:
        plain = [n.id for n in searcher.search_vector(_query()[None], 5)]
        assert [n.id for n in searcher.search_vector(_query()[None], 5, filters=Filters())] == plain
    assert not Filters().active and not Filters(label="").active and Filters(dataset=("x",)).active


@pytest.mark.parametrize("kwargs, says", [
    (dict(min_box_area=1.5), "min_box_area must be between 0 and 1"),
    (dict(min_box_area=-0.1), "min_box_area"),
    (dict(min_score=float("nan")), "min_score"),
    (dict(min_score="high"), "min_score must be a number"),
    (dict(under=("",)), "under needs a non-empty name"),
    (dict(dataset=(" ",)), "dataset needs"),
    (dict(dataset=("x",), not_dataset=("x",)), "both wanted"),
    (dict(under=("/a/b",), not_under=("/a/b/",)), "both wanted"),
])
def test_bad_values_say_what_to_do(kwargs, says):
    with pytest.raises(BadInputError, match=says) as raised:
        Filters(**kwargs)
    assert "\n" not in str(raised.value)


def test_folders_are_resolved_as_the_build_stores_paths(tmp_path: Path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert Filters(under=("link/",)).under == (str((tmp_path / "real").resolve()),)
    assert Filters(under="real").under == Filters(under=(str(tmp_path / "real"),)).under  # one folder, not letters
    assert math.isclose(Filters(min_box_area="0.25").min_box_area, 0.25)


def test_the_box_relation_is_a_parameter_of_the_sql():
    """Object vectors (a `boxes` table, one row a box) will apply the same conditions to their own rows."""
    from simsearch.storage.store import _filter_conditions, _matching_sql

    where, params = _filter_conditions(Filters(label="dog", min_score=0.5, min_box_area=0.1, dataset=("v",)), True)
    assert "b.label = ?" in where and "b.score >= ?" in where and "i.dataset IN (?)" in where
    assert params == ["v", "dog", 0.5, 0.1]
    sql, _ = _matching_sql(Filters(label="dog"), "SELECT * FROM boxes")
    assert "JOIN (SELECT * FROM boxes) b ON b.image_id = i.id" in sql
    assert "b." not in _filter_conditions(Filters(label="dog", dataset=("v",)), False)[0]


# ------------------------------------------------------------ the CLI, end to end on a real index

runner = CliRunner()


def _query_cli(demo_index: Path, *args: str):
    result = runner.invoke(app, ["query", "--id", "1", "--index", str(demo_index), "-k", "30", *args])
    return result


def _rows(result) -> list[dict]:
    """The neighbours of a JSON query: every line after the first, which describes the query."""
    import json

    query, *rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert query["query"]["id"] == 1, query
    return rows


def test_cli_filter_flags_end_to_end(demo_index: Path, demo_data: Path):
    with Store(demo_index) as store:
        records = store.records(store.ids())
    everything = _rows(_query_cli(demo_index))
    assert len(everything) == len(records) - 1
    labelled = {r.id for r in records.values() if "motorbike" in r.classes or
                (r.prediction and r.prediction.label == "motorbike")} - {1}
    assert labelled
    bikes = _query_cli(demo_index, "--class", "motorbike")
    assert bikes.exit_code == 0, bikes.output
    assert {row["id"] for row in _rows(bikes)} == labelled
    folder = Path(records[1].path).parent
    under = _query_cli(demo_index, "--under", str(folder))
    assert {row["id"] for row in _rows(under)} == {
        r.id for r in records.values() if Path(r.path).parent == folder} - {1}
    assert _rows(_query_cli(demo_index, "--not-under", str(folder))) == []
    dataset = records[1].dataset
    assert len(_rows(_query_cli(demo_index, "--dataset", dataset))) == len(everything)
    assert _rows(_query_cli(demo_index, "--not-dataset", dataset, "--dataset", "other")) == []
    big = _query_cli(demo_index, "--min-box-area", "0.5", "--min-score", "0.9", "--format", "table")
    assert big.exit_code == 0, big.output
    for flag, value in (("--min-box-area", "2"), ("--min-score", "-1"), ("--under", "")):
        bad = _query_cli(demo_index, flag, value)
        assert bad.exit_code == 1 and "Traceback" not in bad.output
        assert len(bad.output.strip().splitlines()) == 1 and bad.output.startswith("error: ")
    help_text = runner.invoke(app, ["query", "--help"]).output
    for flag in ("--class", "--min-box-area", "--min-score", "--under", "--not-under", "--dataset", "--not-dataset"):
        assert flag in help_text
