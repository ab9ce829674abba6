"""evaluate-retrieval: the ranking metrics on rankings computed by hand, the edits, and the command on real indexes."""
from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.pipeline.edits import COPYDAYS, edit_rng
from simsearch.retrieval.evaluation import ranks_of_originals, semantic_rankings
from simsearch.retrieval.ranking_metrics import average_precision, precision_at, random_average_precision, recall_at

runner = CliRunner()


# ------------------------------------------------------------ metrics on hand-computed rankings


def test_average_precision_is_the_mean_precision_at_each_relevant_rank():
    # relevant at ranks 1 and 3: (1/1 + 2/3) / 2
    assert average_precision([1, 0, 1, 0])[0] == pytest.approx((1 + 2 / 3) / 2)
    # relevant at ranks 2, 3 and 5: (1/2 + 2/3 + 3/5) / 3
    assert average_precision([0, 1, 1, 0, 1])[0] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
    # a third relevant item the (truncated) ranking never reached counts as precision 0
    assert average_precision([1, 0, 1], n_relevant=3)[0] == pytest.approx((1 + 2 / 3) / 3)
    assert average_precision([1, 1, 0, 0])[0] == 1.0
    assert np.isnan(average_precision([0, 0, 0])[0])  # undefined, not 0
    rows = average_precision([[1, 0, 0], [0, 0, 1]])
    assert rows == pytest.approx([1.0, 1 / 3])


def test_precision_at_k_divides_by_k_even_when_the_ranking_is_shorter():
    ranking = [[1, 0, 1, 1, 0]]
    assert precision_at(ranking, 1)[0] == 1.0
    assert precision_at(ranking, 5)[0] == pytest.approx(0.6)
    assert precision_at(ranking, 10)[0] == pytest.approx(0.3)


def test_random_average_precision_is_exact():
    for n, r in [(6, 2), (5, 1), (5, 5), (7, 3)]:
        brute = np.mean([average_precision(np.array(p) < r)[0] for p in itertools.permutations(range(n))])
        assert random_average_precision(r, n) == pytest.approx(brute), (n, r)
    assert random_average_precision(100, 10_000) == pytest.approx(0.01, abs=0.002)  # about the share of relevant
    assert np.isnan(random_average_precision(0, 10))


def test_recall_at_k_is_the_share_of_the_true_neighbours_found():
    assert recall_at([[1, 2, 3], [7, 8, 9]], [[1, 2, 4], [9, 8, 7]], 3) == pytest.approx((2 / 3 + 1) / 2)
    assert recall_at([[1, -1]], [[1, 5]], 2) == 0.5


def _unit(degrees: float) -> np.ndarray:
    return np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], dtype=np.float32)


def test_semantic_rankings_rank_the_others_and_leave_out_the_query_and_its_copies():
    # Query 0 at 0 degrees sees 1 (10), 2 (20), 3 (30), then 4 (90) in that order.
    xb = np.stack([_unit(a) for a in (0, 10, 20, 30, 90)])
    classes = [frozenset("a"), frozenset("b"), frozenset("a"), frozenset("ab"), frozenset("c")]
    out = semantic_rankings(xb, classes)
    # query 0: relevant 2 and 3 at ranks 2 and 3
    assert out["ap"][0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert out["p@1"][0] == 0 and out["p@5"][0] == pytest.approx(2 / 5)
    assert out["relevant"][0] == 2 and out["ranked"][0] == 4
    assert np.isnan(out["ap"][4])  # class c is held by no other record
    # record 1 a byte-identical copy of 0: 0's ranking loses 1 (not relevant anyway), 1's loses 0
    copies = semantic_rankings(xb, classes, groups=["x", "x", "y", "z", "w"])
    assert copies["ranked"][0] == 3 and copies["ap"][0] == pytest.approx(1.0)
    assert copies["relevant"][1] == 1  # only 3 shares b; 0 is no longer ranked


def test_the_original_ranks_first_unless_another_record_scores_higher():
    xb = np.stack([_unit(a) for a in (0, 40, 80)])
    xq = np.stack([_unit(15), _unit(30)])
    is_original = np.array([[True, False, False], [True, False, False]])
    ranks, best = ranks_of_originals(xq, xb, is_original)
    assert ranks.tolist() == [1, 2]  # 30 degrees is nearer to 40 than to 0
    assert best == pytest.approx([np.cos(np.radians(15)), np.cos(np.radians(30))])


# ------------------------------------------------------------ the edits


def test_copydays_edits_are_seeded_and_do_what_they_say():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    edited = {name: edit(image, edit_rng(0, 7, name)) for name, edit in COPYDAYS.items()}
    again = {name: edit(image, edit_rng(0, 7, name)) for name, edit in COPYDAYS.items()}
    for name in COPYDAYS:
        assert np.array_equal(np.asarray(edited[name]), np.asarray(again[name])), name
        assert edited[name].mode == "RGB", name
    area = 320 * 240
    assert edited["crop50"].width * edited["crop50"].height / area == pytest.approx(0.5, abs=0.01)
    assert edited["crop75"].width * edited["crop75"].height / area == pytest.approx(0.75, abs=0.01)
    assert edited["crop_side"].width * edited["crop_side"].height / area == pytest.approx(0.6, abs=0.01)
    assert np.array_equal(np.asarray(edited["flip"]), np.asarray(image)[:, ::-1])
    assert np.array_equal(np.asarray(edited["none"]), np.asarray(image))
    for name in ("rotate", "jpeg", "scale25", "colour", "text"):
        assert edited[name].size == image.size and not np.array_equal(np.asarray(edited[name]), np.asarray(image))


# ------------------------------------------------------------ the command on real indexes


def _run(*args: str) -> dict:
    result = runner.invoke(app, ["evaluate-retrieval", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_on_photos_and_voc_the_descriptor_beats_chance_and_survives_edits(real_index: Path):
    report = _run("--index", str(real_index), "--sample", "10", "--seed", "3")
    semantic = report["semantic"]
    assert semantic["labelled"] == 16 and semantic["queries"] >= 12  # the VOC images; the photos have no boxes
    overall = semantic["overall"]
    assert overall["map"] > overall["random_map"] + 0.15, overall
    assert overall["precision"]["p@1"] > overall["random_precision"]
    assert {c["label"] for c in semantic["per_class"]} >= {"person", "chair", "car"}
    edits = {e["edit"]: e for e in report["near_duplicates"]["edits"]}
    assert report["near_duplicates"]["images"] == 10
    assert set(edits) == set(COPYDAYS) | {"all edits"}
    assert edits["none"]["recall"]["r@1"] == 1.0  # the original re-embedded finds itself: the pipelines agree
    for name in ("flip", "jpeg", "crop75", "colour"):
        assert edits[name]["recall"]["r@1"] >= 0.9, edits[name]
    assert edits["all edits"]["queries"] == 10 * (len(COPYDAYS) - 1)
    rows = report["index_recall"]["rows"]
    assert [r["n"] for r in rows] == [90, 29]
    assert all(r["recall"] == 1.0 for r in rows)  # a small index is exact (Flat)


def test_table_and_skipping(demo_index: Path):
    result = runner.invoke(app, ["evaluate-retrieval", "--index", str(demo_index), "--skip", "near-duplicates",
                                 "--format", "table", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "semantic:" in result.stdout and "mAP" in result.stdout and "random mAP" in result.stdout
    assert "near-duplicates" not in result.stdout
    assert "self-match removed" in result.stdout  # the index part runs on stored vectors alone


def test_an_index_without_labels_still_measures_the_rest(demo_data: Path, tmp_path: Path):
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    plain = tmp_path / "plain"
    plain.mkdir()
    for source in sorted((demo_data / "images").iterdir())[:4]:
        shutil.copy(source, plain / source.name)
    index = tmp_path / "index"
    build_index(BuildConfig(plain, index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    report = _run("--index", str(index), "--sample", "2")
    assert "no labelled records" in report["semantic"]["note"] and report["semantic"]["overall"] is None
    assert report["near_duplicates"]["images"] == 2
    assert report["index_recall"]["rows"]
    table = runner.invoke(app, ["evaluate-retrieval", "--index", str(index), "--sample", "0", "-f", "table", "-q"])
    assert table.exit_code == 0 and "no labelled records" in table.stdout


@pytest.mark.parametrize("args, says", [
    (["--index", "/nowhere/at/all"], "no index here"),
    (["--skip", "everything"], "cannot skip everything"),
])
def test_bad_input_is_one_line(args: list[str], says: str, tmp_path: Path):
    result = runner.invoke(app, ["evaluate-retrieval", *args])
    assert result.exit_code == 1
    assert "Traceback" not in result.output and says in result.output
    assert len(result.output.strip().splitlines()) == 1
