"""The query's own contents above its neighbours, and the localizer's training data kept apart from the collection.

One real index holds two datasets: indoor-boxes (85 photos with drawn boxes, which the
head is trained on) and the 13 shared photos (no boxes; their dataset is the scanned folder's name). Needs ../shared; skips without.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.retrieval.filters import Filters
from simsearch.retrieval.scope import LeftOut, leave_out_training

runner = CliRunner()
TRAINED = "indoor-boxes"


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, shared_data: Path) -> tuple[Path, Path]:
    """(index, an outside JPEG of the cat): indoor-boxes + photos indexed, a head trained on the boxes, predictions stored."""
    from simsearch.localizer.predict import localize
    from simsearch.localizer.train import TrainConfig, train
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    indoor, photos = shared_data / "indoor-boxes", shared_data / "photos"
    if not indoor.is_dir() or not photos.is_dir():
        pytest.skip(f"indoor-boxes or photos not found in {shared_data}")
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(indoor, root / "data" / TRAINED)
    shutil.copytree(photos, root / "data" / "photos")
    index = root / "index"
    build_index(BuildConfig(root / "data", index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    train(TrainConfig(index, epochs=6, quiet=True))
    localize(index)
    outside = root / "cat.jpg"  # not the indexed bytes: its contents come from its own forward pass
    Image.open(photos / "chelsea.png").convert("RGB").save(outside, quality=90)
    return index, outside


def _datasets(searcher, neighbours) -> set[str]:
    return {n.record.dataset for n in neighbours}


def test_the_head_records_the_datasets_it_trained_on(mixed):
    from simsearch.localizer.head import Localizer

    index, _ = mixed
    assert Localizer.load(index).spec.training["datasets"] == [TRAINED]


def test_an_outside_file_gets_tags_and_a_prediction_from_one_forward_pass(mixed, monkeypatch):
    from simsearch.retrieval.searcher import Searcher

    index, outside = mixed
    with Searcher(index, device="cpu") as searcher:
        passes = []
        embed = searcher.embedder.embed_images
        monkeypatch.setattr(searcher.embedder, "embed_images", lambda images: passes.append(1) or embed(images))
        result = searcher.search(outside, 5)
        assert len(passes) == 1  # the tags and the prediction came from the pass that embedded it
        contents = result.contents
        assert contents.seen == "embedded" and result.record is None
        assert contents.tags[0].label == "Egyptian cat" and not contents.objects
        assert len(contents.predictions) == 1 and contents.prediction.head_version
        assert 0 <= contents.prediction.xmin < contents.prediction.xmax <= 451


def test_an_indexed_query_shows_what_the_index_stored(mixed):
    from simsearch.retrieval.searcher import Searcher

    index, _ = mixed
    with Searcher(index, device="cpu") as searcher:
        indoor = next(r for r in searcher.store.records(searcher.store.ids()).values() if r.dataset == TRAINED)
        contents = searcher.search(indoor.id, 3).contents
        assert contents.seen == "stored" and contents.predictions == [indoor.prediction]
        assert contents.objects == indoor.objects and contents.tags == indoor.tags
        by_file = searcher.search(indoor.path, 3)  # the same bytes as a file: the same record
        assert by_file.record.id == indoor.id
        assert dataclasses.replace(by_file.contents, copies=None) == dataclasses.replace(contents, copies=None)
        # ... which the file query names, and the query by id does not (a record is no copy of itself).
        assert by_file.contents.copies.exact == [indoor.id] and contents.copies.exact == []


def test_training_images_are_left_out_by_default_inside_the_search(mixed):
    from simsearch.retrieval.searcher import Searcher

    index, outside = mixed
    with Searcher(index, device="cpu") as searcher:
        indoor = next(i for i, r in searcher.store.records(searcher.store.ids()).items() if r.dataset == TRAINED)
        default = searcher.search(indoor, 10)
        assert default.left_out == LeftOut((TRAINED,), 85)
        assert len(default.neighbours) == 10 and TRAINED not in _datasets(searcher, default.neighbours)
        everything = searcher.search(indoor, 10, include_training=True)
        assert everything.left_out is None and TRAINED in _datasets(searcher, everything.neighbours)
        chosen = searcher.search(indoor, 10, Filters(dataset=(TRAINED,)))  # an explicit --dataset wins
        assert chosen.left_out is None and _datasets(searcher, chosen.neighbours) == {TRAINED}
        objects = searcher.search_objects(outside, 5)  # object search, same rule
        assert objects.left_out is not None and TRAINED not in _datasets(searcher, objects.neighbours)


def test_leave_out_rules():
    counts = {"VOCsynth": 300, "photos": 13}
    scoped, left = leave_out_training(None, ["VOCsynth"], counts)
    assert scoped.not_dataset == ("VOCsynth",) and left.text() == (
        "left out 300 training images of VOCsynth; --include-training to see them")
    assert leave_out_training(None, ["VOCsynth"], {"VOCsynth": 300}) == (None, None)  # all training: keep all
    assert leave_out_training(None, ["VOC2007"], counts) == (None, None)  # trained elsewhere
    mine = Filters(not_dataset=("photos",), tag="cup")
    scoped, left = leave_out_training(mine, ["VOCsynth"], counts)
    assert scoped.not_dataset == ("photos", "VOCsynth") and scoped.tag == "cup" and left.images == 300
    assert leave_out_training(Filters(not_dataset=("VOCsynth",)), ["VOCsynth"], counts)[1] is None
    explicit = Filters(dataset=("VOCsynth",))
    assert leave_out_training(explicit, ["VOCsynth"], counts) == (explicit, None)


def test_cli_table_and_json_start_with_the_query_and_say_what_was_left_out(mixed, tmp_path):
    index, outside = mixed
    table = runner.invoke(app, ["query", str(outside), "--index", str(index), "-k", "3", "--format", "table",
                                "--device", "cpu", "--html", str(tmp_path / "q.html")])
    assert table.exit_code == 0, table.output
    above, header = table.stdout.splitlines()[:2]
    # A JPEG of an indexed photo: named as its near-duplicate first, then what its own pass saw.
    assert above.startswith(f"query: {outside}  near-duplicate of id ") and "  predicted: " in above, above
    assert "  tags: Egyptian cat 0." in above, above
    assert header.split()[:3] == ["rank", "id", "score"]
    assert table.stderr.count(f"left out 85 training images of {TRAINED}; --include-training to see them") == 1
    page = (tmp_path / "q.html").read_text()
    chips = page.split('id="query-contents"', 1)[1].split('<div class="grid">', 1)[0]
    assert 'class="tag pred"' in chips and "Egyptian cat 0." in chips and 'id="left-out"' in page
    lines = runner.invoke(app, ["query", str(outside), "--index", str(index), "-k", "3", "--device", "cpu"]).stdout
    query, *rows = [json.loads(line) for line in lines.splitlines()]
    shown = query["query"]
    assert shown["path"] == str(outside) and shown["id"] is None and shown["seen"] == "embedded"
    assert shown["prediction"] == shown["predictions"][0] and set(shown["prediction"]) == {"label", "score", "box"}
    assert shown["tags"][0]["label"] == "Egyptian cat" and shown["left_out"] == {"datasets": [TRAINED], "images": 85}
    assert shown["duplicates"]["exact"] == [] and shown["duplicates"]["near"][0]["score"] >= 0.9
    assert len(rows) == 3 and all(r["dataset"] != TRAINED for r in rows)
    every = runner.invoke(app, ["query", "--id", "1", "--index", str(index), "-k", "3", "--include-training"])
    assert every.exit_code == 0 and "left out" not in every.stderr
    assert json.loads(every.stdout.splitlines()[0])["query"]["left_out"] is None


def test_serve_shows_the_query_contents_and_can_include_training(mixed):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from simsearch.views.serve import ServeConfig, create_app

    index, outside = mixed
    client = TestClient(create_app(index, ServeConfig(device="cpu")))
    assert client.get("/api/info").json()["training_datasets"] == [TRAINED]
    upload = client.post("/api/search", files={"file": ("cat.jpg", outside.read_bytes(), "image/jpeg")},
                         data={"k": "3"}).json()
    query = upload["query"]
    assert query["seen"] == "embedded" and query["tags"][0]["label"] == "Egyptian cat" and query["predictions"]
    assert query["left_out"]["datasets"] == [TRAINED] and all(n["dataset"] != TRAINED for n in upload["neighbours"])
    included = client.post("/api/search", files={"file": ("cat.jpg", outside.read_bytes(), "image/jpeg")},
                           data={"k": "3", "include_training": "true"}).json()
    assert included["query"]["left_out"] is None
    by_id = client.get("/api/search", params={"id": 1, "k": 3, "include_training": True}).json()["query"]
    assert by_id["seen"] == "stored" and by_id["prediction"] is not None and by_id["left_out"] is None
    assert 'id="training"' in client.get("/").text and 'id="qcontents"' in client.get("/").text


def test_a_damaged_head_does_not_stop_plain_searches(mixed, tmp_path):
    """Only object searches need the head: a plain query still answers, without the head's contents or scope."""
    from simsearch.errors import IndexDamagedError
    from simsearch.localizer.head import HEAD_FILE
    from simsearch.retrieval.searcher import Searcher

    index, outside = mixed
    copy = tmp_path / "index"
    shutil.copytree(index, copy)
    (copy / HEAD_FILE).write_bytes(b"not a torch file")
    with Searcher(copy, device="cpu") as searcher:
        result = searcher.search(outside, 3)
        assert len(result.neighbours) == 3
        assert result.contents.predictions == [] and result.contents.tags  # tags come from the backbone, not the head
        with pytest.raises(IndexDamagedError):
            searcher.search_objects(outside, 3)


def test_a_head_applied_from_another_index_is_kept_for_new_images_and_queries(mixed, tmp_path, shared_data):
    """localize --head copies the head in: a later build predicts the new photos, and an outside query gets its prediction."""
    from simsearch.localizer.head import Localizer
    from simsearch.localizer.predict import localize
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig
    from simsearch.retrieval.searcher import Searcher
    from simsearch.storage.store import Store

    labelled, outside = mixed
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee.png", "rocket.jpg"):
        shutil.copy(shared_data / "photos" / name, photos / name)
    index = tmp_path / "index"
    config = BuildConfig(photos, index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True))
    build_index(config)
    assert not Localizer.exists(index)
    localize(index, head_dir=labelled)
    assert Localizer.load(index).spec.version == Localizer.load(labelled).spec.version
    shutil.copy(shared_data / "photos" / "flower.jpg", photos / "flower.jpg")
    build_index(config)
    with Store(index) as store:
        assert store.ids_without_prediction() == [] and store.count() == 3
    with Searcher(index, device="cpu") as searcher:
        result = searcher.search(outside, 2)
    assert len(result.contents.predictions) == 1
