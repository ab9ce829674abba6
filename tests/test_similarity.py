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
    x = 3.0 * backgrounds[rng.integers(0, 6, n)] + 1.0 * objects[cls] + 0.8 * rng.normal(size=(n, dim))
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
    learned = _map(cross_fitted_rankings(x, classes, groups))
    plain = _map(cross_fitted_rankings(x, classes, groups, plain=True))
    assert learned > plain + 0.15, (learned, plain)


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
            assert result.neighbours[0].id == int(ids[np.argmax(plain)])  # the nearest in appearance first
            for n in result.neighbours:
                assert n.score == pytest.approx(float(xb[ids == n.id][0] @ xq), abs=1e-4)  # scores say how alike
                assert n.to_json()["learned"] == n.learned is not None
            rest = [n.learned for n in result.neighbours[1:]]
            assert rest == sorted(rest, reverse=True)  # then the learned order
            assert [n.id for n in result.neighbours] != [int(i) for i in ids[np.argsort(-plain)[:10]]]


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
    recall = {mode: {e["edit"]: e["recall"]["r@1"] for e in r["near_duplicates"]["edits"]} for mode, r in reports.items()}
    assert recall["auto"] == recall["plain"]


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
