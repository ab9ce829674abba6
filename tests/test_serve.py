"""The serve app in-process (FastAPI's TestClient) over the offline demo index (real photos, real weights)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from simsearch.views.serve import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(demo_index: Path) -> TestClient:
    return TestClient(create_app(demo_index, ServeConfig(device="cpu", max_upload_bytes=2 * 1024 * 1024)))


def _id_of(client: TestClient, name: str) -> int:
    records = client.get("/api/records?limit=500").json()["records"]
    return next(r["id"] for r in records if r["name"] == name)


def test_page_and_openapi(client: TestClient):
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text and "/api/search" in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/records/{image_id}/crop", "/api/info"} <= set(paths)
    assert "post" in paths["/api/search"] and "get" in paths["/api/search"]


def test_upload_finds_the_other_motorcycle_view(client: TestClient, demo_data: Path):
    data = (demo_data / "images" / "motorcycle_left.png").read_bytes()
    r = client.post("/api/search", files={"file": ("m.png", data, "image/png")}, data={"k": "4"})
    assert r.status_code == 200, r.text
    neighbours = r.json()["neighbours"]
    assert [n["rank"] for n in neighbours] == [1, 2, 3, 4]
    assert neighbours[0]["name"] == "motorcycle_right.png"
    assert all(n["name"] != "motorcycle_left.png" for n in neighbours)  # the same file is no answer
    # ... so the query says the index already holds it, as `simsearch query` does
    assert r.json()["query"]["duplicates"]["exact"] == [_id_of(client, "motorcycle_left.png")]
    fresh = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(fresh, "JPEG", quality=95)  # new bytes: no exact copy
    r = client.post("/api/search", files={"file": ("m.jpg", fresh.getvalue(), "image/jpeg")}, data={"k": "4"})
    copies = r.json()["query"]["duplicates"]
    assert copies["exact"] == [] and [n["id"] for n in copies["near"]][:1] == [_id_of(client, "motorcycle_left.png")]
    scores = [n["score"] for n in neighbours]
    assert scores == sorted(scores, reverse=True)
    crop = client.get(neighbours[0]["crop_url"])
    assert crop.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(crop.content)).size) == 256


def test_the_query_contents_come_before_the_neighbours(client: TestClient, demo_data: Path):
    coffee = _id_of(client, "coffee.png")
    by_id = client.get(f"/api/search?id={coffee}&k=2").json()["query"]
    assert by_id["seen"] == "stored" and by_id["tags"][0]["label"] == "espresso"
    assert [o["label"] for o in by_id["objects"]] == ["cup"] and by_id["prediction"] is None
    assert by_id["left_out"] is None  # no localizer, no training data to leave out
    buffer = io.BytesIO()  # other bytes than the indexed file: tags from the upload's own pass
    Image.open(demo_data / "images" / "coffee.png").convert("RGB").save(buffer, "JPEG", quality=92)
    r = client.post("/api/search", files={"file": ("c.jpg", buffer.getvalue(), "image/jpeg")}, data={"k": "2"})
    upload = r.json()["query"]
    assert upload["seen"] == "embedded" and upload["tags"][0]["label"] == "espresso" and upload["objects"] == []
    region = client.get(f"/api/search?id={coffee}&k=2&box=0,0,200,200").json()["query"]
    assert region["seen"] in ("embedded", "stored") and "tags" in region
    page = client.get("/").text
    assert 'id="qcontents"' in page and "showContents(result.query)" in page


def test_search_by_id_region_and_class_filter(client: TestClient):
    bike = _id_of(client, "motorcycle_left.png")
    r = client.get(f"/api/search?id={bike}&k=3").json()
    assert r["neighbours"][0]["name"] == "motorcycle_right.png"
    assert bike not in [n["id"] for n in r["neighbours"]]
    region = client.get(f"/api/search?id={bike}&k=3&box=100,50,400,200").json()
    assert region["query"]["box"] == [100, 50, 400, 200]
    filtered = client.get(f"/api/search?id={bike}&k=5&label=person").json()["neighbours"]
    assert len(filtered) == 3 and all("person" in n["classes"] for n in filtered)  # the demo's three people
    assert client.get(f"/api/search?id={bike}&box=1,2,3").status_code == 400
    assert client.get("/api/search?id=999999").status_code == 404


def test_only_index_files_are_served(client: TestClient):
    record = client.get("/api/records?limit=1").json()["records"][0]
    full = client.get(record["image_url"])
    assert full.status_code == 200 and len(full.content) > 1000
    for url in ["/api/records/..%2F..%2F..%2Fetc%2Fpasswd/image", "/api/records/1/../../../../etc/passwd",
                "/../../../etc/passwd", "/api/records/%2Fetc%2Fpasswd/image", "/api/image?path=/etc/passwd",
                "/static/..%2F..%2Fetc%2Fpasswd"]:
        r = client.get(url)
        assert r.status_code in (404, 422), url
        assert b"root:" not in r.content
    assert "path" not in record  # the API never hands out filesystem paths either


def test_oversized_uploads_are_refused(client: TestClient):
    big = b"\xff" * (2 * 1024 * 1024 + 10)
    r = client.post("/api/search", files={"file": ("big.jpg", big, "image/jpeg")})
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: cut off while streaming
        for _ in range(40):
            yield b"\0" * 65536

    r = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413


def test_not_an_image_is_a_clear_400(client: TestClient):
    r = client.post("/api/search", files={"file": ("x.jpg", b"not an image", "image/jpeg")})
    assert r.status_code == 400 and "cannot decode" in r.json()["detail"]


def test_records_page_filtered_by_class(client: TestClient):
    bikes = client.get("/api/records?label=motorbike").json()
    assert bikes["total"] == len(bikes["records"]) == 2
    assert all("motorbike" in r["classes"] for r in bikes["records"])
    assert client.get("/api/records?label=no-such-class").json()["total"] == 0


def test_search_routes_take_every_filter(client: TestClient, demo_data: Path, demo_index: Path):
    from simsearch.storage.store import Store

    bike = _id_of(client, "motorcycle_left.png")
    folder = str((demo_data / "images").resolve())
    info = client.get("/api/info").json()
    assert info["datasets"]
    dataset = info["datasets"][0]
    everything = client.get(f"/api/search?id={bike}&k=50").json()["neighbours"]
    for query, kept in [(f"under={folder}", len(everything)), (f"not_under={folder}", 0),
                        (f"dataset={dataset}", len(everything)), (f"not_dataset={dataset}", 0),
                        ("dataset=no-such&dataset=" + dataset, len(everything)),
                        ("min_score=0.5&label=person", 3)]:
        r = client.get(f"/api/search?id={bike}&k=50&{query}")
        assert r.status_code == 200, (query, r.text)
        assert len(r.json()["neighbours"]) == kept, query
    with Store(demo_index) as store:  # a large box: the neighbours are those with one, however few
        sizes = store.sizes(store.ids())
        large = {i for i, objects in store.objects(store.ids()).items()
                 if any(o.area >= 0.3 * sizes[i][0] * sizes[i][1] for o in objects)} - {bike}
    assert large
    r = client.get(f"/api/search?id={bike}&k=50&min_box_area=0.3").json()["neighbours"]
    assert {n["id"] for n in r} == large
    for bad in ("min_box_area=2", "min_score=-1", "dataset=x&not_dataset=x"):
        r = client.get(f"/api/search?id={bike}&{bad}")
        assert r.status_code == 400 and "\n" not in r.json()["detail"], bad
    data = (demo_data / "images" / "motorcycle_left.png").read_bytes()
    r = client.post("/api/search", files={"file": ("m.png", data, "image/png")},
                    data={"k": "5", "label": "person", "min_score": "0.5", "under": folder, "dataset": ""})
    assert r.status_code == 200, r.text
    assert len(r.json()["neighbours"]) == 3 and all("person" in n["classes"] for n in r.json()["neighbours"])
    r = client.post("/api/search", files={"file": ("m.png", data, "image/png")}, data={"min_box_area": "7"})
    assert r.status_code == 400 and "between 0 and 1" in r.json()["detail"]
    picked = client.get(f"/api/records?dataset={dataset}&label=person").json()
    assert picked["total"] == 3


# ---------------------------------------------------------------- object search (the demo's hand-drawn boxes)


def _astronaut_copy(demo_data: Path, tmp_path: Path) -> Path:
    """astronaut.png as another file (other bytes): not excluded as the query itself, so it can be found."""
    copy = tmp_path / "astronaut-copy.jpg"
    Image.open(demo_data / "images" / "astronaut.png").convert("RGB").save(copy, "JPEG", quality=90)
    return copy


HELMET = "275,342,512,512"  # astronaut.png's helmet box (its largest box, and so its usual crop, is the person)


def test_a_drawn_box_searches_the_objects_index_and_names_the_matched_box(client: TestClient, demo_data: Path,
                                                                           tmp_path: Path):
    assert client.get("/api/info").json()["object_search"] is True
    data = _astronaut_copy(demo_data, tmp_path).read_bytes()
    r = client.post("/api/search", files={"file": ("a.jpg", data, "image/jpeg")}, data={"k": "5", "box": HELMET})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "objects" and body["query"]["box"] == [275, 342, 512, 512]
    assert body["query"]["parts"] == [{"label": None, "box": [275.0, 342.0, 512.0, 512.0], "source": "drawn"}]
    first = body["neighbours"][0]
    assert first["name"] == "astronaut.png"  # found by its helmet, not by the person around it
    assert first["match"]["label"] == "helmet" and first["match"]["source"] == "truth"
    assert first["match"]["box"] == [275.0, 342.0, 512.0, 512.0] and first["score"] > 0.8
    assert first["why"]["text"].startswith("its helmet ~ your box (") and first["why"]["object"] == first["match"]
    ids = [n["id"] for n in body["neighbours"]]
    assert len(ids) == len(set(ids)) and all(n["match"] and n["why"] for n in body["neighbours"])
    # The matched box's crop: the helmet's shape (237x170), not the person's (350x497) that crop_url shows.
    assert first["match_crop_url"] == f"/api/boxes/{first['match']['object_id']}/crop"
    crop = client.get(first["match_crop_url"])
    assert crop.status_code == 200 and crop.headers["content-type"] == "image/jpeg"
    w, h = Image.open(io.BytesIO(crop.content)).size
    assert abs(w / h - 237 / 170) < 0.1
    assert client.get("/api/boxes/999999/crop").status_code == 404


def test_by_id_a_box_and_the_objects_toggle_search_objects(client: TestClient):
    bike = _id_of(client, "motorcycle_left.png")
    r = client.get(f"/api/search?id={bike}&k=3&box=92,10,688,452").json()
    assert r["mode"] == "objects" and r["query"]["box"] == [92, 10, 688, 452]
    first = r["neighbours"][0]
    assert first["name"] == "motorcycle_right.png" and first["match"]["label"] == "motorbike"
    assert first["why"]["text"].startswith("its motorbike ~ your box (")
    astronaut = _id_of(client, "astronaut.png")
    own = client.get(f"/api/search?id={astronaut}&k=4&objects=true").json()
    assert own["mode"] == "objects" and sorted(p["label"] for p in own["query"]["parts"]) == ["helmet", "person"]
    assert astronaut not in [n["id"] for n in own["neighbours"]]
    assert all(n["match"]["object_id"] >= 0 and n["why"]["query"]["label"] in ("helmet", "person")
               for n in own["neighbours"])
    # The class filter holds in object search too.
    people = client.get(f"/api/search?id={bike}&k=5&box=92,10,688,452&label=person").json()["neighbours"]
    assert len(people) == 3 and all("person" in n["classes"] for n in people)
    # A whole-image search says why too, and points at the object its reason names.
    whole = client.get(f"/api/search?id={_id_of(client, 'camera.png')}&k=3").json()  # its person ~ grace_hopper's
    assert whole["mode"] == "image" and all(n["why"] for n in whole["neighbours"])
    named = [n for n in whole["neighbours"] if n["why"]["object"]]
    assert named and all(n["match_crop_url"] == f"/api/boxes/{n['why']['object']['object_id']}/crop" for n in named)


@pytest.fixture(scope="module")
def plain_client(tmp_path_factory) -> TestClient:
    """An index of a plain folder: no boxes, so no objects index."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import hostile
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    root = tmp_path_factory.mktemp("plain")
    hostile.shape_folder(root / "data", 6, seed=3)
    build_index(BuildConfig(root / "data", root / "index", EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    return TestClient(create_app(root / "index", ServeConfig(device="cpu")))


def test_without_objects_a_box_is_cropped_and_embedded(plain_client: TestClient):
    assert plain_client.get("/api/info").json()["object_search"] is False
    first = plain_client.get("/api/records?limit=1").json()["records"][0]["id"]
    r = plain_client.get(f"/api/search?id={first}&k=3&box=10,10,150,150").json()
    assert r["mode"] == "crop" and r["query"]["box"] == [10, 10, 150, 150]
    assert len(r["neighbours"]) == 3 and all(n["match"] is None and n["why"] is None for n in r["neighbours"])
    toggle = plain_client.get(f"/api/search?id={first}&k=3&objects=true")
    assert toggle.status_code == 400 and "no objects to search with" in toggle.json()["detail"]
