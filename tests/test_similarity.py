"""The learned similarity: fitted from ground-truth classes, searched query-side, scored held out."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simsearch.retrieval.evaluation import cross_fitted_rankings, ranks_of_originals, semantic_rankings
from simsearch.storage import similarity
from simsearch.storage.similarity import MIN_LABELLED, fit, pinned_first


def _scenes(n: int = 120, seed: int = 0) -> tuple[np.ndarray, list[frozenset[str]]]:
    """Unit vectors dominated by one of 6 backgrounds, with a weaker direction for one of 4 classes.

    The shape of the composites: a plain cosine mostly says which background an image
    has, while relevance is the class.
    """
    rng = np.random.default_rng(seed)
    dim = 64
    backgrounds, objects = rng.normal(size=(6, dim)), rng.normal(size=(4, dim))
    cls = rng.integers(0, 4, n)
    x = 3.0 * backgrounds[rng.integers(0, 6, n)] + 1.0 * objects[cls] + 1.5 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [frozenset({f"c{c}"}) for c in cls]


def _map(rankings: dict) -> float:
    return float(np.nanmean(rankings["ap"]))


def test_too_few_labels_or_one_class_learn_nothing():
    x, classes = _scenes()
    assert fit(x[:MIN_LABELLED - 1], classes[:MIN_LABELLED - 1]) is None
    assert fit(x, [frozenset({"same"})] * len(x)) is None
    assert fit(x, classes) is not None


def test_moved_queries_are_unit_vectors_and_survive_json():
    x, classes = _scenes()
    learned = fit(x, classes)
    moved = learned.queries(x[:5])
    assert np.allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-5)
    again = similarity.LearnedSimilarity.from_json(learned.to_json())
    assert np.allclose(again.queries(x[:5]), moved)
    assert again.classes == ("c0", "c1", "c2", "c3")


def test_held_out_classes_rank_better_than_by_appearance():
    x, classes = _scenes()
    groups = list(range(len(x)))
    (learned, fitted), (plain, _) = cross_fitted_rankings(x, classes, groups), \
        cross_fitted_rankings(x, classes, groups, plain=True)
    assert fitted == 2 and _map(learned) > _map(plain) + 0.15, (_map(learned), _map(plain))


def test_the_nearest_in_appearance_stays_first():
    assert pinned_first([3, 1, 2], 2) == [2, 3, 1]
    assert pinned_first([3, 1], 7) == [7, 3, 1]
    assert pinned_first([3, 1], None) == [3, 1]
    x, classes = _scenes()
    learned = fit(x, classes)
    # Queries that are slight edits of stored rows: the plain best is their own row.
    rng = np.random.default_rng(1)
    xq = x[:40] + 0.05 * rng.normal(size=(40, x.shape[1])).astype(np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    own = np.eye(len(x), dtype=bool)[:40]
    plain_ranks, _ = ranks_of_originals(xq, x, own)
    learned_ranks, _ = ranks_of_originals(xq, x, own, learned)
    assert (plain_ranks == 1).all() and (learned_ranks == 1).all()
    # and in a semantic ranking the plain nearest (itself left out) is never pushed down
    scores = semantic_rankings(x, classes, learned=learned)
    assert scores["p@1"].mean() == pytest.approx(semantic_rankings(x, classes)["p@1"].mean())


# ------------------------------------------------------------ on real labelled photos


@pytest.fixture(scope="module")
def indoor_indexes(tmp_path_factory, shared_data: Path) -> dict[str, Path]:
    """indoor-boxes (85 real photos, 30 classes) indexed twice: learned (the default) and plain."""
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    data = tmp_path_factory.mktemp("indoor") / "indoor-boxes"
    shutil.copytree(shared_data / "indoor-boxes", data)
    made = {}
    for mode in ("auto", "plain"):
        index_dir = tmp_path_factory.mktemp("ix") / mode
        report = build_index(BuildConfig(data, index_dir, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True),
                                         similarity=mode))
        assert report.similarity == ("learned" if mode == "auto" else "plain")
        made[mode] = index_dir
    return made


def test_learned_search_on_real_photos(indoor_indexes):
    from simsearch.retrieval.searcher import Searcher

    with Searcher(indoor_indexes["auto"], device="cpu") as searcher:
        assert searcher.similarity is not None and searcher.similarity.labelled == 85
        ids, xb = searcher.store.vectors()
        for query in (int(ids[0]), int(ids[40])):
            result = searcher.search(query, k=10)
            xq = xb[ids == query][0]
            plain = xb @ xq
            plain[ids == query] = -np.inf
            best = int(np.argmax(plain))
            if searcher.cutoff is None or plain[best] >= searcher.cutoff:
                assert result.neighbours[0].id == int(ids[best])  # the nearest in appearance first, when a good match
            else:  # a weak nearest is no copy: the learned order decides from the top
                assert result.neighbours[0].learned == max(n.learned for n in result.neighbours)
            for n in result.neighbours:
                assert n.score == pytest.approx(float(xb[ids == n.id][0] @ xq), abs=1e-4)  # scores say how alike
                assert n.learned is not None
                assert n.to_json()["learned"] == n.learned
            rest = [n.learned for n in result.neighbours[1:]]
            assert rest == sorted(rest, reverse=True)  # then the learned order
            assert [n.id for n in result.neighbours] != [int(i) for i in ids[np.argsort(-plain)[:10]]]
        # a query whose nearest is weak: no pin, the learned order from the top (and good nearests exist too)
        scores = xb @ xb.T
        np.fill_diagonal(scores, -np.inf)
        weak = np.flatnonzero(scores.max(1) < searcher.cutoff)
        assert 0 < len(weak) < len(ids)
        first = searcher.search(int(ids[weak[0]]), k=5).neighbours
        assert first[0].learned == max(n.learned for n in first)


def test_evaluate_retrieval_scores_the_learned_similarity_held_out(indoor_indexes):
    from simsearch.cli import app

    reports = {}
    for mode, index_dir in indoor_indexes.items():
        out = CliRunner().invoke(app, ["evaluate-retrieval", "--index", str(index_dir), "--sample", "12", "--quiet",
                                       "--skip", "index"])
        assert out.exit_code == 0, out.output
        reports[mode] = json.loads(out.stdout)
    learned, plain = reports["auto"]["semantic"], reports["plain"]["semantic"]
    assert plain["ranking"] == "plain" and plain["plain"] is None
    assert learned["ranking"].startswith("learned, held out")
    # The bar, held out: at least 5 points over appearance on the same halves.
    assert learned["overall"]["map"] >= learned["plain"]["map"] + 0.05, learned
    recall = {mode: {e["edit"]: e["recall"] for e in r["near_duplicates"]["edits"]} for mode, r in reports.items()}
    for edit, plain_recall in recall["plain"].items():
        assert recall["auto"][edit]["r@1"] == plain_recall["r@1"]  # the pin's promise
        assert recall["auto"][edit]["r@5"] >= plain_recall["r@5"] - 1 / 12  # at most one of 12 copies lost from the top 5


def test_info_and_a_plain_rebuild(indoor_indexes, tmp_path: Path):
    from simsearch.cli import app

    out = CliRunner().invoke(app, ["info", "--index", str(indoor_indexes["auto"]), "--format", "table"])
    assert "learned from 85 labelled images, 30 classes" in out.output
    copy = tmp_path / "copy"
    shutil.copytree(indoor_indexes["auto"], copy)
    from simsearch.storage.store import Store

    with Store(copy) as store:
        before = store.get_meta(similarity.META_KEY)
        assert similarity.ensure_learned(store) is not None
        assert store.get_meta(similarity.META_KEY) == before  # labels unchanged: no refit
        assert similarity.ensure_learned(store, "plain") is None
        assert store.get_meta(similarity.META_KEY) == ""
    out = CliRunner().invoke(app, ["info", "--index", str(copy), "--format", "table"])
    assert "plain appearance" in out.output


def test_filters_exclusions_and_the_pin_under_the_learned_order(indoor_indexes):
    from simsearch.retrieval.filters import Filters
    from simsearch.retrieval.searcher import Searcher

    with Searcher(indoor_indexes["auto"], device="cpu") as searcher:
        ids, xb = searcher.store.vectors()
        chairs = set(searcher.store.ids_matching(Filters(label="chair")).tolist())
        query = int(ids[5])
        plain = {int(i): float(s) for i, s in zip(ids, xb @ xb[5])}
        nearest = max((i for i in chairs if i != query), key=plain.get)
        result = searcher.search_vector(xb[5], k=4, exclude={query, nearest}, filters=Filters(label="chair"))
        got = [n.id for n in result]
        assert len(got) == 4 and set(got) <= chairs - {query, nearest}
        assert got[0] == max(chairs - {query, nearest}, key=plain.get)  # the nearest the filter lets through
        # k larger than the index: every other record once, the nearest first
        every = searcher.search_vector(xb[5], k=500, exclude={query})
        assert len(every) == len(ids) - 1 and len({n.id for n in every}) == len(every)


def test_an_open_searcher_follows_a_refit_and_plain_sticks(indoor_indexes, tmp_path: Path):
    from simsearch.retrieval.searcher import Searcher
    from simsearch.storage.store import Store

    copy = tmp_path / "copy"
    shutil.copytree(indoor_indexes["auto"], copy)
    with Searcher(copy, device="cpu") as searcher:
        assert searcher.ranked_by == "learned"
        with Store(copy) as store:
            assert similarity.ensure_learned(store, "plain") is None
        assert searcher.refresh() and searcher.ranked_by == "plain"
        assert searcher.search(1, k=3).ranked_by == "plain"
        with Store(copy) as store:
            assert similarity.ensure_learned(store) is None  # no option: the index stays plain
            assert similarity.ensure_learned(store, "auto") is not None
        assert searcher.refresh() and searcher.ranked_by == "learned"


def test_a_damaged_vector_does_not_poison_the_fit():
    x, classes = _scenes()
    x = x.copy()
    x[3] = np.nan
    learned = fit(x, classes)
    assert learned is not None and learned.labelled == len(x) - 1
    assert np.isfinite(learned.queries(x[:2])).all()


def test_the_app_says_how_it_ranked(indoor_indexes):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from simsearch.views.serve import ServeConfig, create_app

    for mode, expected in (("auto", "learned"), ("plain", "plain")):
        client = TestClient(create_app(indoor_indexes[mode], ServeConfig(device="cpu")))
        found = client.get("/api/search", params={"id": 1, "k": 3}).json()
        assert found["ranked_by"] == found["query"]["ranked_by"] == expected
        assert all((n["learned"] is not None) == (mode == "auto") for n in found["neighbours"])


def test_a_few_labels_say_why_nothing_was_learned_or_scored(shared_data: Path, tmp_path: Path):
    """25 labelled photos: learned, but half of them is too few to score it held out; 19: plain, and info says why."""
    from simsearch.cli import app

    source = shared_data / "indoor-boxes"
    names = sorted(p.stem for p in (source / "ground-truth").glob("*.txt"))
    for n in (25, 19):
        data = tmp_path / f"d{n}" / "indoor-boxes"
        (data / "images").mkdir(parents=True)
        (data / "ground-truth").mkdir()
        for name in names[:n]:
            shutil.copy(source / "ground-truth" / f"{name}.txt", data / "ground-truth")
            shutil.copy(next((source / "images").glob(f"{name}.*")), data / "images")
        index = tmp_path / f"ix{n}"
        built = CliRunner().invoke(app, ["build-index", str(data), "--index", str(index), "-m", "efficientnet-lite0",
                                         "--quiet", "--device", "cpu"])
        assert built.exit_code == 0, built.output
        shown = CliRunner().invoke(app, ["info", "--index", str(index), "--format", "table"]).output
        if n == 19:
            assert "plain appearance: learning needs 20 images with ground-truth classes" in shown
            assert "this index has 19 labelled" in shown
            continue
        assert "learned from 25 labelled images" in shown
        out = CliRunner().invoke(app, ["evaluate-retrieval", "--index", str(index), "--sample", "0", "--quiet",
                                       "--skip", "index"])
        semantic = json.loads(out.stdout)["semantic"]
        assert semantic["ranking"] == "plain" and semantic["plain"] is None
        assert "could not be scored held out" in semantic["note"]


def test_the_html_page_shows_the_score_that_ordered_it(indoor_indexes, tmp_path: Path):
    from simsearch.retrieval.searcher import Searcher
    from simsearch.views.page import render_query_page

    with Searcher(indoor_indexes["auto"], device="cpu") as searcher:
        result = searcher.search(1, k=3)
        text = render_query_page(indoor_indexes["auto"], result, tmp_path / "q.html")
    assert text.count("learned ") >= 3 and f"learned {result.neighbours[1].learned:.3f}" in text


def test_a_build_that_moved_no_label_reads_no_labels(indoor_indexes, tmp_path: Path, monkeypatch):
    """The fit remembers the store's generations: an unchanged index is not re-read, a changed one is checked."""
    from simsearch.storage.store import Store

    copy = tmp_path / "copy"
    shutil.copytree(indoor_indexes["auto"], copy)
    with Store(copy) as store:
        fitted = similarity.ensure_learned(store)
        assert fitted.generations == f"{store.generation}/{store.boxes_generation}"
        reads = []
        monkeypatch.setattr(similarity, "labelled", lambda s: reads.append(1) or ([], []))
        assert similarity.ensure_learned(store).digest == fitted.digest
        assert not reads
