"""Browsing the whole library: file-name and orientation filters in the store, folders named without server
paths, and the app's /api/records paging through every record."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simsearch.errors import BadInputError
from simsearch.records import ImageRecord
from simsearch.retrieval.filters import Filters
from simsearch.retrieval.library import folders_of
from simsearch.spec import EmbedderSpec, IndexSpec
from simsearch.storage.store import NewImage, Store

SPEC = EmbedderSpec("synthetic", "none", "0" * 64, 8, (1, 1, 1))
# (path below the root, width, height)
FILES = [("trips/rome/Colosseum.JPG", 400, 300), ("trips/rome/forum.jpg", 300, 400),
         ("trips/oslo/fjord.png", 500, 500), ("trips/oslo/100%_fjord_.png", 640, 480),
         ("screens/fjordmap.png", 100, 300), ("trips-old/rome.jpg", 200, 100)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("library").resolve() / "photos"
    rng = np.random.default_rng(0)
    with Store(root.parent / "index", create=True) as s:
        s.save_spec(IndexSpec(SPEC, index_type=None))
        s.add_images([NewImage(ImageRecord(root / name, "folder", "photos"), f"{i:064x}", 1, 1, w, h,
                               rng.standard_normal(8).astype(np.float32)) for i, (name, w, h) in enumerate(FILES)])
        yield s, root


def _names(store: Store, filters: Filters) -> set[str]:
    records = store.records(store.ids_matching(filters).tolist())
    return {Path(r.path).name for r in records.values()}


def test_name_matches_the_file_name_in_any_case_never_its_folders(store):
    s, _ = store
    assert _names(s, Filters(name="FJORD")) == {"fjord.png", "100%_fjord_.png", "fjordmap.png"}
    assert _names(s, Filters(name="rome")) == {"rome.jpg"}  # not the files in trips/rome/
    assert _names(s, Filters(name="%")) == {"100%_fjord_.png"}  # LIKE's wildcards are plain text
    assert _names(s, Filters(name="_f")) == {"100%_fjord_.png"}
    assert _names(s, Filters(name="  ")) == {Path(n).name for n, _, _ in FILES}  # blank: no filter


def test_orientation_compares_width_and_height(store):
    s, _ = store
    assert _names(s, Filters(orientation="landscape")) == {"Colosseum.JPG", "100%_fjord_.png", "rome.jpg"}
    assert _names(s, Filters(orientation="Portrait")) == {"forum.jpg", "fjordmap.png"}
    assert _names(s, Filters(orientation="square")) == {"fjord.png"}
    assert _names(s, Filters(orientation="square", name="fjord")) == {"fjord.png"}
    with pytest.raises(BadInputError, match="landscape, portrait, square"):
        Filters(orientation="tall")


def test_folders_are_named_below_the_root_and_count_their_subfolders(store):
    s, root = store
    folders = folders_of(s.folders())
    assert folders.root == str(root)
    assert folders.images == {"": 6, "screens": 1, "trips": 4, "trips/oslo": 2, "trips/rome": 2, "trips-old": 1}
    assert [f["folder"] for f in folders.listed()] == ["screens", "trips", "trips-old", "trips/oslo", "trips/rome"]
    assert not any(str(root) in str(f) for f in folders.listed())  # no server path in what a client sees
    trips = folders.under("trips/")
    assert trips == str(root / "trips")
    assert len(s.ids_matching(Filters(under=(trips,)))) == 4  # trips-old is another folder
    with pytest.raises(BadInputError, match="no folder"):
        folders.under("../etc")
    assert folders_of({}).images == {}


fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from simsearch.views.serve import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(demo_index: Path) -> TestClient:
    return TestClient(create_app(demo_index, ServeConfig(device="cpu")))


def test_records_page_through_every_record_once(client: TestClient, demo_index: Path):
    with Store(demo_index) as s:
        everything = s.ids()
    seen, offset = [], 0
    while True:
        page = client.get(f"/api/records?offset={offset}&limit=5").json()
        assert page["total"] == len(everything) and page["offset"] == offset and page["limit"] == 5
        if not page["records"]:
            break
        assert len(page["records"]) <= 5
        # Positions in the listing, not search ranks restarting at 1 on every page; no similarity score.
        assert [r["rank"] for r in page["records"]] == list(range(offset + 1, offset + 1 + len(page["records"])))
        assert all(r["score"] is None and r["weak"] is False for r in page["records"])
        seen += [r["id"] for r in page["records"]]
        offset += 5
    assert seen == everything  # in id order, none twice, none missed


def test_records_filter_by_name_orientation_and_class_together(client: TestClient, demo_index: Path):
    with Store(demo_index) as s:
        records = list(s.records(s.ids()).values())
    page = client.get("/api/records?name=MOTORCYCLE&limit=500").json()
    assert sorted(r["name"] for r in page["records"]) == ["motorcycle_left.png", "motorcycle_right.png"]
    for orientation, holds in (("landscape", lambda r: r.width > r.height), ("portrait", lambda r: r.height > r.width),
                               ("square", lambda r: r.width == r.height)):
        page = client.get(f"/api/records?orientation={orientation}&limit=500").json()
        assert {r["id"] for r in page["records"]} == {r.id for r in records if holds(r)}, orientation
        assert page["total"] == len(page["records"])
    person = client.get("/api/records?label=person&orientation=portrait&limit=500").json()["records"]
    assert person and all("person" in r["classes"] and r["height"] > r["width"] for r in person)
    assert client.get("/api/records?orientation=diagonal").status_code == 400


def test_info_names_folders_relative_and_records_take_one(client: TestClient, demo_index: Path):
    info = client.get("/api/info").json()
    assert info["orientations"] == ["landscape", "portrait", "square"] and info["picker_page"] == 60
    with Store(demo_index) as s:
        direct = s.folders()
    assert info["folders"] == folders_of(direct).listed()  # the demo's photos share one folder: none below it
    assert client.get("/api/records?folder=").json()["total"] == sum(direct.values())  # empty: every folder
    response = client.get("/api/records?folder=../../etc")
    assert response.status_code == 400 and "no folder" in response.json()["detail"]


def test_a_folder_narrows_the_records_to_it_and_below(library_index: Path):
    client = TestClient(create_app(library_index, ServeConfig(device="cpu")))
    folders = {f["folder"]: f["images"] for f in client.get("/api/info").json()["folders"]}
    assert folders == {"animals": 3, "people": 3, "things": 3, "things/vehicles": 2}
    for folder, n in folders.items():
        page = client.get(f"/api/records?folder={folder}&limit=500").json()
        assert page["total"] == n == len(page["records"])
    vehicles = client.get("/api/records?folder=things/vehicles").json()["records"]
    assert sorted(r["name"] for r in vehicles) == ["motorcycle_left.png", "motorcycle_right.png"]
    # a folder and the other filters hold together
    page = client.get("/api/records?folder=things&orientation=landscape&limit=500").json()
    assert {r["name"] for r in page["records"]} == {"motorcycle_left.png", "motorcycle_right.png", "coffee.png"}


def test_searches_take_folders_as_the_app_lists_them(library_index: Path):
    """The folder menu names folders relative to the library; a search's `under` takes those names too."""
    from fastapi.testclient import TestClient

    from simsearch.views.serve import ServeConfig, create_app

    client = TestClient(create_app(library_index, ServeConfig(device="cpu")))
    listed = {f["folder"] for f in client.get("/api/info").json()["folders"]}
    assert "things/vehicles" in listed
    records = client.get("/api/records", params={"limit": 50}).json()["records"]
    coffee = next(r["id"] for r in records if r["name"] == "coffee.png")
    found = client.get("/api/search", params={"id": coffee, "k": 8, "under": "things/vehicles"})
    assert found.status_code == 200, found.text
    assert {n["name"] for n in found.json()["neighbours"]} == {"motorcycle_left.png", "motorcycle_right.png"}
    left_out = client.get("/api/search", params={"id": coffee, "k": 8, "not_under": "animals"}).json()
    assert not {"chelsea.png", "horse.png", "coins.png"} & {n["name"] for n in left_out["neighbours"]}
    unknown = client.get("/api/search", params={"id": coffee, "k": 8, "under": "nowhere"})
    assert unknown.status_code == 400 and "no folder 'nowhere'" in unknown.text
    picked = client.get("/api/records", params={"under": "things"}).json()  # the picker narrows by the same names
    assert {r["name"] for r in picked["records"]} == {"coffee.png", "motorcycle_left.png", "motorcycle_right.png"}


def test_the_browsers_icon_request_is_answered_without_an_error(client: TestClient):
    assert client.get("/favicon.ico").status_code == 204
