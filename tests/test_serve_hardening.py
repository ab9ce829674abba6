"""`serve` under hostile or careless use: decompression bombs, bad uploads, out-of-range ids,
path leaks, exposure beyond loopback, a port in use.

Runs over a tiny efficientnet-lite0 index of generated pictures (no ../shared needed).
"""
from __future__ import annotations

import io
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageStat

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import simsearch.views.http_guards as http_guards  # noqa: E402
import simsearch.views.serve as serve  # noqa: E402
from simsearch.cli import app as cli_app  # noqa: E402
from simsearch.errors import BadInputError  # noqa: E402
from simsearch.views.serve import ServeConfig, create_app  # noqa: E402

BLUE, RED = (20, 40, 220), (230, 20, 20)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder, index folder): six small pictures, JPEG and PNG, indexed with real weights."""
    from simsearch.pipeline.build import BuildConfig, build_index
    from simsearch.pipeline.embed import EmbedConfig

    root = tmp_path_factory.mktemp("hardening")
    data = root / "data"
    data.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (120, 120, 120), (30, 200, 200)]
    for i, colour in enumerate(colours):
        im = Image.new("RGB", (320, 240), (240, 240, 240))
        draw = ImageDraw.Draw(im)
        (draw.ellipse if i % 2 else draw.rectangle)((40 + 10 * i, 30, 260, 210), fill=colour)
        im.save(data / (f"pic{i}.jpg" if i % 2 else f"pic{i}.png"))
    index = root / "index"
    build_index(BuildConfig(data, index, EmbedConfig("efficientnet-lite0", device="cpu", quiet=True)))
    return data, index


@pytest.fixture(scope="module")
def client(built) -> TestClient:
    # raise_server_exceptions=False: a server error must show as the 500 a browser would get
    app = create_app(built[1], ServeConfig(device="cpu", max_upload_bytes=4 * 1024 * 1024))
    return TestClient(app, raise_server_exceptions=False)


def _ids(client: TestClient) -> list[int]:
    return [r["id"] for r in client.get("/api/records").json()["records"]]


def _png_bomb(width: int, height: int) -> bytes:
    """A valid all-black greyscale PNG of width x height pixels: ~350 KB on disk for 19000x19000 (361 MB decoded)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    packer, row = zlib.compressobj(9), b"\0" * (width + 1)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, quality=85) if fmt == "JPEG" else image.save(buf, fmt)
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ 1. decompression bombs


def test_png_bomb_upload_is_413_naming_size_and_limit(client: TestClient):
    bomb = _png_bomb(19000, 19000)
    assert len(bomb) < 400_000
    r = client.post("/api/search", files={"file": ("bomb.png", bomb, "image/png")})
    assert r.status_code == 413, r.text
    detail = r.json()["detail"]
    assert detail.startswith("image too large: bomb.png: 19000x19000 pixels")
    assert "limit of 64 MP" in detail and "--max-pixels" not in detail  # server-side advice is not for the client


@pytest.fixture(scope="module")
def quadrants_jpeg() -> bytes:
    """4096x4096 (16.8 MP) JPEG: blue, with its bottom-right quadrant red."""
    im = Image.new("RGB", (4096, 4096), BLUE)
    im.paste(RED, (2048, 2048, 4096, 4096))
    return _encoded(im, "JPEG")


def test_max_pixels_refuses_larger_uploads_and_jpegs_decode_only_what_the_search_needs(
        built, quadrants_jpeg: bytes, monkeypatch):
    app = create_app(built[1], ServeConfig(device="cpu", max_pixels=5_000_000))
    browser, embedded = app.state.browser, []
    real_embed = browser._look
    monkeypatch.setattr(browser, "_look", lambda image: embedded.append(image.copy()) or real_embed(image))
    client = TestClient(app, raise_server_exceptions=False)

    png = _encoded(Image.new("RGB", (3000, 3000), BLUE), "PNG")  # 9 MP, over this server's 5 MP
    r = client.post("/api/search", files={"file": ("big.png", png, "image/png")})
    assert r.status_code == 413 and "3000x3000" in r.json()["detail"] and "limit of 5 MP" in r.json()["detail"]
    assert embedded == []

    # A 16.8 MP JPEG fits a 5 MP limit: a whole-image search decodes it at 1/8 scale.
    r = client.post("/api/search", files={"file": ("q.jpg", quadrants_jpeg, "image/jpeg")}, data={"k": "2"})
    assert r.status_code == 200, r.text
    assert (r.json()["query"]["width"], r.json()["query"]["height"]) == (4096, 4096)  # the file's own size
    assert max(embedded[-1].size) <= 512

    # A region keeps 2048 px a side (4.2 MP): the box, in the file's pixels, lands on the red quadrant.
    r = client.post("/api/search", files={"file": ("q.jpg", quadrants_jpeg, "image/jpeg")},
                    data={"k": "2", "box": "2048,2048,4096,4096"})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["box"] == [2048, 2048, 4096, 4096]
    region = embedded[-1]
    assert region.size == (1024, 1024)
    red, green, blue = ImageStat.Stat(region).mean
    assert red > 200 and blue < 60, (red, green, blue)

    # A region of a record is decoded under the same limit.
    record = _ids(client)[0]
    r = client.get(f"/api/search?id={record}&k=2&box=10,10,200,200")
    assert r.status_code == 200 and r.json()["query"]["box"] == [10, 10, 200, 200]


def test_index_files_are_decoded_under_the_limit(built):
    client = TestClient(create_app(built[1], ServeConfig(device="cpu", max_pixels=50_000)),  # 320x240 = 76.8k
                        raise_server_exceptions=False)
    record = _ids(client)[0]
    for url in (f"/api/records/{record}/image?overlay=true", f"/api/search?id={record}&box=10,10,200,200"):
        r = client.get(url)
        assert r.status_code == 413, (url, r.text)
        assert "320x240" in r.json()["detail"] and f"record {record}" in r.json()["detail"]


def test_concurrent_decodes_are_bounded(client: TestClient, monkeypatch):
    browser = client.app.state.browser
    active, peak, guard = 0, 0, threading.Lock()
    real_open = serve.open_image

    def slow_open(*args, **kwargs):
        nonlocal active, peak
        with guard:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.3)
            return real_open(*args, **kwargs)
        finally:
            with guard:
                active -= 1

    monkeypatch.setattr(serve, "open_image", slow_open)
    png = _encoded(Image.new("RGB", (64, 64), RED), "PNG")
    errors: list[BaseException] = []

    def upload():
        try:
            browser.search_upload(png, 2, name="red.png")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert peak == 2  # two at a time: bounded, yet not serialised


# ------------------------------------------------------------------ 2. messages name the upload


def test_not_an_image_names_the_uploaded_file(client: TestClient):
    r = client.post("/api/search", files={"file": ("holiday photo.jpg", b"this is not an image", "image/jpeg")})
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert detail.startswith("holiday photo.jpg: cannot decode image")
    assert "BytesIO" not in detail and " at 0x" not in detail
    r = client.post("/api/search", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 400 and "empty.png" in r.json()["detail"] and "empty" in r.json()["detail"]


# ------------------------------------------------------------------ 3. ids out of range


@pytest.mark.parametrize("bad", [2**63 - 1, 2**63, 99999999999999999999, -1, -(2**63) - 1])
def test_ids_out_of_range_are_refused_on_every_route(client: TestClient, bad: int):
    """Never a 500: the largest SQLite id is an honest 404, anything outside 0..2**63-1 fails validation (422)."""
    urls = [f"/api/records/{bad}", f"/api/records/{bad}/image", f"/api/records/{bad}/image?overlay=true",
            f"/api/records/{bad}/thumb", f"/api/records/{bad}/crop", f"/api/search?id={bad}",
            f"/api/search?id={bad}&box=1,1,50,50"]
    for url in urls:
        r = client.get(url)
        assert r.status_code == (404 if bad == 2**63 - 1 else 422), (url, r.status_code, r.text)
    r = client.get(f"/api/records?offset={bad}")
    assert r.status_code == (200 if 0 <= bad < 2**63 else 422), r.text


def test_the_api_schema_states_the_id_range(client: TestClient):
    paths = client.get("/openapi.json").json()["paths"]
    id_params = [p for route in paths.values() for op in route.values() for p in op.get("parameters", [])
                 if p["name"] in ("image_id", "id")]
    assert len(id_params) == 6  # /api/records/{id}, its image, thumb and crop, GET /api/search and GET /api/export
    assert all((p["schema"]["minimum"], p["schema"]["maximum"]) == (0, 2**63 - 1) for p in id_params)


# ------------------------------------------------------------------ 4. no absolute paths


def test_no_response_carries_an_absolute_path(built, tmp_path: Path):
    data, index = built
    link = tmp_path / "my-index"
    link.symlink_to(index, target_is_directory=True)  # the path as given differs from the resolved one
    client = TestClient(create_app(link, ServeConfig(device="cpu")), raise_server_exceptions=False)
    record = _ids(client)[0]
    info = client.get("/api/info")
    assert info.status_code == 200 and info.json()["index"] == "my-index"

    victim = next(data.glob("*.jpg"))
    victim_id = next(r["id"] for r in client.get("/api/records").json()["records"] if r["name"] == victim.name)
    responses = [info] + [client.get(url) for url in [
        "/", "/docs", "/openapi.json", "/api/records", f"/api/records/{record}", "/api/records/999999",
        "/api/records/999999/image", "/api/records/999999/thumb", "/api/records/999999/crop",
        "/api/search?id=999999", f"/api/search?id={record}&k=3", f"/api/search?id={record}&box=1,2,3",
        "/api/records/abc", "/api/nothing"]]
    responses.append(client.post("/api/search", files={"file": ("x.jpg", b"junk", "image/jpeg")}))
    assert {r.status_code for r in responses} >= {200, 400, 404, 422}

    original = victim.read_bytes()  # the record's file damaged after the build: decode errors name the record
    shutil.rmtree(index / "thumbs", ignore_errors=True)
    try:
        victim.write_bytes(b"garbage, not a jpeg")
        damaged = [client.get(f"/api/records/{victim_id}/{what}")
                   for what in ("image?overlay=true", "thumb", "crop")]
        damaged.append(client.get(f"/api/search?id={victim_id}&box=10,10,200,200"))
        assert [r.status_code for r in damaged] == [400] * 4, [r.text for r in damaged]
        assert all(f"record {victim_id} ({victim.name})" in r.json()["detail"] for r in damaged)
        victim.unlink()
        gone = client.get(f"/api/records/{victim_id}/image")
        assert gone.status_code == 404 and victim.name in gone.json()["detail"]
        damaged.append(gone)
    finally:
        victim.write_bytes(original)
        shutil.rmtree(index / "thumbs", ignore_errors=True)

    secrets = {str(index), str(index.resolve()), str(link), str(link.absolute()), str(data), str(data.resolve())}
    for r in responses + damaged:
        body = r.content.decode("utf-8", "replace")
        for secret in secrets:
            assert secret not in body, (r.request.url, secret, body[:300])


# ------------------------------------------------------------------ 5. token


TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def token_app(built):
    return create_app(built[1], ServeConfig(device="cpu", token=TOKEN, max_upload_bytes=1024 * 1024))


def test_with_a_token_every_request_needs_it(token_app):
    client = TestClient(token_app, raise_server_exceptions=False)
    for url in ["/", "/api/info", "/api/records", "/docs", "/openapi.json", "/api/records/1/thumb",
                "/api/search?id=1", "/?token=wrong", "/api/info?token="]:
        r = client.get(url)
        assert r.status_code == 401, url
        assert "token" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    for header in ["Bearer wrong", f"Basic {TOKEN}", TOKEN, f"Bearer {TOKEN}x"]:
        assert client.get("/api/info", headers={"Authorization": header}).status_code == 401, header
    forged = TestClient(token_app, raise_server_exceptions=False)
    forged.cookies.set(http_guards.TOKEN_COOKIE, TOKEN)
    assert forged.get("/api/info").status_code == 401  # the cookie holds an HMAC, not the token itself
    # Refused before the body is read: a large upload gets 401, not 413.
    r = client.post("/api/search", files={"file": ("x.png", b"\0" * (2 * 1024 * 1024), "image/png")})
    assert r.status_code == 401

    ok = client.get("/api/info", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["images"] == 6
    r = client.post("/api/search", headers={"Authorization": f"bearer {TOKEN}"},
                    files={"file": ("x.jpg", b"junk", "image/jpeg")})
    assert r.status_code == 400  # past the gate: the app's own answer


def test_token_in_the_page_url_sets_a_cookie_for_the_page_requests(token_app):
    browser = TestClient(token_app, raise_server_exceptions=False)
    page = browser.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and "<script>" in page.text
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(f"{http_guards.TOKEN_COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert TOKEN not in cookie
    record = browser.get("/api/records").json()["records"][0]  # the cookie jar carries it from here on
    assert browser.get(record["thumb_url"]).status_code == 200
    assert browser.get(f"/api/search?id={record['id']}&k=2").status_code == 200
    browser.cookies.clear()
    assert browser.get("/api/info").status_code == 401


# ------------------------------------------------------------------ 5, 6. the CLI


@pytest.fixture
def served(monkeypatch):
    """Invoke `simsearch serve ...` with uvicorn replaced: returns (result, the config run() got)."""
    calls: list[dict] = []

    def fake_run(index, host, port, config, sock=None, announce=None, **_):
        calls.append({"host": host, "port": port, "config": config})
        if announce is not None:  # the index "opened"
            announce()
        if sock is not None:
            sock.close()

    monkeypatch.setattr(serve, "run", fake_run)
    monkeypatch.delenv("SIMSEARCH_TOKEN", raising=False)

    def invoke(*args: str, env: dict | None = None):
        result = CliRunner().invoke(cli_app, ["serve", "--index", "idx", "--port", str(_free_port()), *args], env=env)
        return result, (calls[-1]["config"] if calls else None)

    return invoke


def test_serve_options_reach_the_config(served):
    result, config = served("--max-pixels", "5")
    assert result.exit_code == 0, result.output
    assert config.max_pixels == 5_000_000 and config.token is None
    assert "warning" not in result.stderr  # loopback: nothing to warn about
    result, config = served(env={"SIMSEARCH_TOKEN": "from-env"})
    assert config.token == "from-env"
    result, config = served("--token", "from-flag")
    assert config.token == "from-flag" and "?token=TOKEN" in result.stderr and "from-flag" not in result.stderr


def test_binding_beyond_loopback_warns_and_suggests_a_token(served):
    result, config = served("--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    assert "warning: 0.0.0.0 is reachable from other machines" in result.stderr
    assert "no authentication" in result.stderr and "--token" in result.stderr
    result, config = served("--host", "0.0.0.0", env={"SIMSEARCH_TOKEN": "t0k"})
    assert config.token == "t0k"
    assert "warning" in result.stderr and "no authentication" not in result.stderr
    assert http_guards.is_loopback("localhost") and http_guards.is_loopback("::1") and not http_guards.is_loopback("0.0.0.0")


def test_serving_is_announced_only_once_the_index_opens(tmp_path: Path):
    result = CliRunner().invoke(cli_app, ["serve", "--index", str(tmp_path / "nope"), "--port", str(_free_port())])
    assert result.exit_code == 1
    assert "simsearch: serving" not in result.stderr and result.stderr.count("error:") == 1, result.stderr


def test_port_in_use_is_one_line(built, tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", "--index", str(built[1]), "--port", str(port)])
        assert result.exit_code == 1
        assert result.stderr == f"error: port {port} on 127.0.0.1 is in use; pass --port\n"
        started = time.monotonic()  # the library checks before loading the index or starting uvicorn
        with pytest.raises(BadInputError, match=f"^port {port} on 127.0.0.1 is in use; pass --port$"):
            serve.run(tmp_path / "no-index-here", "127.0.0.1", port)
        assert time.monotonic() - started < 5
