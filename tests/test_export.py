"""Taking results away: `query --format csv`, and the app's ZIP of the neighbours' files with results.csv."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from simsearch.cli import app
from simsearch.errors import ExportTooLargeError
from simsearch.storage.store import Store
from simsearch.views.results_csv import COLUMNS

runner = CliRunner()


def _id_of(index: Path, name: str) -> int:
    with Store(index) as store:
        return next(r.id for r in store.records(store.ids()).values() if Path(r.path).name == name)


def _csv(text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames) == COLUMNS
    return list(reader)


def test_query_csv_has_one_row_per_neighbour_as_json_has_them(demo_index: Path, demo_data: Path):
    image = str(demo_data / "images" / "motorcycle_left.png")
    as_json = runner.invoke(app, ["query", image, "--index", str(demo_index), "-k", "5"])
    as_csv = runner.invoke(app, ["query", image, "--index", str(demo_index), "-k", "5", "--format", "csv"])
    assert as_csv.exit_code == 0, as_csv.output
    neighbours = [json.loads(line) for line in as_json.stdout.splitlines()[1:]]
    rows = _csv(as_csv.stdout)  # stdout is the table alone: the query line went to stderr
    assert "query:" not in as_csv.stdout and "query:" in as_csv.stderr
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [int(r["id"]) for r in rows] == [n["id"] for n in neighbours]
    assert [r["path"] for r in rows] == [n["path"] for n in neighbours]
    assert Path(rows[0]["path"]).name == "motorcycle_right.png"
    assert [float(r["score"]) for r in rows] == pytest.approx([n["score"] for n in neighbours], abs=1e-4)
    for row, n in zip(rows, neighbours):
        assert row["classes"] == "; ".join(sorted({o["label"] for o in n["objects"]}))
        assert row["tags"].split("; ")[0].startswith(n["tags"][0]["label"]) if n["tags"] else row["tags"] == ""
        assert row["weak"] == str(n["weak"])
    first = rows[0]
    assert first["boxes"].startswith("motorbike ") and len(first["boxes"].split(" ", 1)[1].split(",")) == 4


def test_query_csv_with_objects_names_the_matched_box(demo_index: Path):
    record = _id_of(demo_index, "astronaut.png")
    result = runner.invoke(app, ["query", "--id", str(record), "--objects", "--index", str(demo_index), "-k", "3",
                                 "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = _csv(result.stdout)
    assert len(rows) == 3 and all(r["matched_box"] and r["matched_score"] for r in rows)
    assert all(r["why"] for r in rows)


def test_query_csv_takes_the_name_and_orientation_filters(demo_index: Path):
    record = _id_of(demo_index, "astronaut.png")
    result = runner.invoke(app, ["query", "--id", str(record), "--index", str(demo_index), "-k", "20",
                                 "--orientation", "landscape", "--name", "O", "--format", "csv"])
    assert result.exit_code == 0, result.output
    rows = _csv(result.stdout)
    with Store(demo_index) as store:
        wanted = {r.id for r in store.records(store.ids()).values()
                  if r.width > r.height and "o" in Path(r.path).name.lower()} - {record}
    assert rows and {int(r["id"]) for r in rows} == wanted
    bad = runner.invoke(app, ["query", "--id", str(record), "--index", str(demo_index), "--orientation", "tall"])
    assert bad.exit_code == 1 and "landscape, portrait, square" in bad.output and "Traceback" not in bad.output


def test_a_file_gone_since_the_build_keeps_its_row_with_no_image(tmp_path: Path):
    from simsearch.views.export import export_items, zip_results

    kept = tmp_path / "kept.jpg"
    kept.write_bytes(b"\xff\xd8 not really a jpeg, but bytes to copy")
    neighbours = [{"rank": 1, "id": 7, "name": "kept.jpg", "score": 0.9, "objects": [], "tags": []},
                  {"rank": 2, "id": 8, "name": "gone.jpg", "score": 0.5, "objects": [], "tags": []}]
    items = export_items(neighbours, [kept, tmp_path / "gone.jpg"], limit=1000)
    archive = _unzip(b"".join(zip_results({"query": {"id": 1}}, items)))
    rows = _csv(archive.read("results.csv").decode())
    assert [(r["id"], r["path"]) for r in rows] == [("7", "images/1-kept.jpg"), ("8", "")]
    assert archive.read("images/1-kept.jpg") == kept.read_bytes()
    with pytest.raises(ExportTooLargeError, match="export limit"):
        export_items(neighbours, [kept, None], limit=kept.stat().st_size - 1)


def test_commands_without_csv_refuse_it_in_one_line(demo_index: Path):
    result = runner.invoke(app, ["info", "--index", str(demo_index), "--format", "csv"])
    assert result.exit_code != 0
    assert "csv" in result.output and "Traceback" not in result.output
    assert runner.invoke(app, ["info", "--index", str(demo_index), "--format", "json"]).exit_code == 0


fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from simsearch.views.serve import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(demo_index: Path) -> TestClient:
    return TestClient(create_app(demo_index, ServeConfig(device="cpu")))


def _unzip(content: bytes) -> zipfile.ZipFile:
    archive = zipfile.ZipFile(io.BytesIO(content))
    assert archive.testzip() is None  # every member's CRC checks out
    return archive


def test_export_by_id_zips_the_original_files_with_the_search_as_csv(client: TestClient, demo_index: Path):
    record = _id_of(demo_index, "motorcycle_left.png")
    search = client.get(f"/api/search?id={record}&k=6").json()
    response = client.get(f"/api/export?id={record}&k=6")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert f'filename="simsearch-id{record}.zip"' in response.headers["content-disposition"]
    archive = _unzip(response.content)
    rows = _csv(archive.read("results.csv").decode())
    assert [int(r["id"]) for r in rows] == [n["id"] for n in search["neighbours"]]
    assert [float(r["score"]) for r in rows] == pytest.approx([n["score"] for n in search["neighbours"]], abs=1e-4)
    assert rows[0]["path"] == "images/1-motorcycle_right.png"
    with Store(demo_index) as store:
        originals = store.records([int(r["id"]) for r in rows])
    for row in rows:  # each image byte for byte, under the name its row gives
        original = Path(originals[int(row["id"])].path)
        assert row["path"].endswith(original.name)
        assert hashlib.sha256(archive.read(row["path"])).hexdigest() == hashlib.sha256(original.read_bytes()).hexdigest()
    assert sorted(archive.namelist()) == sorted([r["path"] for r in rows] + ["results.csv", "query.json"])
    query = json.loads(archive.read("query.json"))
    assert query["query"]["id"] == record and query["mode"] == "image"
    assert query["asked"]["id"] == str(record) and "k" in query["asked"]  # how it was searched, not only what came back
    assert all(not str(v).startswith("/") for v in query["query"].values() if isinstance(v, str))


def test_export_takes_the_search_filters(client: TestClient, demo_index: Path):
    record = _id_of(demo_index, "astronaut.png")
    filtered = client.get(f"/api/search?id={record}&k=10&orientation=landscape").json()["neighbours"]
    rows = _csv(_unzip(client.get(f"/api/export?id={record}&k=10&orientation=landscape").content)
                .read("results.csv").decode())
    assert [int(r["id"]) for r in rows] == [n["id"] for n in filtered]
    assert rows and all(int(r["width"]) > int(r["height"]) for r in rows)
    asked = json.loads(_unzip(client.get(f"/api/export?id={record}&k=10&orientation=landscape").content)
                       .read("query.json"))["asked"]
    assert asked == {"id": str(record), "k": "10", "orientation": "landscape"}


def test_export_of_an_upload_posts_the_same_form(client: TestClient, demo_data: Path):
    data = (demo_data / "images" / "motorcycle_left.png").read_bytes()
    form = {"file": ("m.png", data, "image/png")}
    search = client.post("/api/search", files=form, data={"k": "3"}).json()
    response = client.post("/api/export", files=form, data={"k": "3"})
    assert response.status_code == 200, response.text
    archive = _unzip(response.content)
    rows = _csv(archive.read("results.csv").decode())
    assert [int(r["id"]) for r in rows] == [n["id"] for n in search["neighbours"]]
    assert rows[0]["path"] == "images/1-motorcycle_right.png"
    query = json.loads(archive.read("query.json"))
    assert query["query"]["upload"] is True and query["asked"] == {"file": "m.png", "k": "3"}


def test_an_export_over_the_size_limit_is_refused_before_it_streams(client: TestClient, demo_index: Path):
    record = _id_of(demo_index, "motorcycle_left.png")
    ids = [n["id"] for n in client.get(f"/api/search?id={record}&k=8").json()["neighbours"]]
    with Store(demo_index) as store:
        sizes = [Path(r.path).stat().st_size for r in store.records(ids).values()]
    tight = TestClient(create_app(demo_index, ServeConfig(device="cpu", max_export_bytes=sum(sizes) - 1)))
    response = tight.get(f"/api/export?id={record}&k=8")
    assert response.status_code == 413
    detail = response.json()["detail"]
    assert "export limit" in detail and "smaller k" in detail
    assert tight.get(f"/api/export?id={record}&k=1").status_code == 200  # one file fits


def test_api_docs_load_nothing_from_outside(client: TestClient):
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        sources = [part.split('"')[1] for part in html.split("src=")[1:]] + \
                  [part.split('"')[1] for part in html.split("href=")[1:]]
        assert sources and all(s.startswith("/") for s in sources), sources
        for source in sources:
            assert client.get(source).status_code == 200, source
    assert "SwaggerUIBundle" in client.get("/docs").text
