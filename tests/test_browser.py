"""The serve page in a real headless Chromium (Debian's package) driven by Playwright.

Skips with a reason when chromium or playwright is missing; never downloads a browser.
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import LIBRARY_FOLDERS

CHROMIUM = os.environ.get("SIMSEARCH_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"),
                               args=ARGS, headless=True)
        yield b
        b.close()


@contextmanager
def _serving(index: Path, **config):
    """The app over `index` on a free local port, in a thread: yields its base URL."""
    import uvicorn

    from simsearch.views.serve import ServeConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(index, ServeConfig(device="cpu", **config)),
                                        host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(demo_index: Path):
    with _serving(demo_index) as url:
        yield url


def test_upload_shows_neighbour_cards(browser, server, demo_data: Path, tmp_path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("#picker img")  # the index's thumbnails loaded through the API
    page.set_input_files("#file", str(demo_data / "images" / "motorcycle_left.png"))
    page.wait_for_selector(".card")
    cards = page.locator(".card")
    assert cards.count() == 12
    assert "motorcycle_right.png" in cards.first.inner_text()
    # above the neighbours, what the engine sees in the query: its drawn class and its ImageNet tags
    contents = page.locator("#qcontents")
    assert contents.is_visible() and contents.inner_text().startswith("In the query:")
    assert "motorbike" in contents.inner_text() and "moped 0." in contents.inner_text()
    assert not page.locator("#training-row").is_visible()  # no localizer here: no training images to include
    # every card's crop and thumbnail really decoded
    page.wait_for_function("[...document.querySelectorAll('.card img')].every(i => i.complete && i.naturalWidth > 0)")
    shot = tmp_path / "serve-upload.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000
    if os.environ.get("SIMSEARCH_SCREENSHOTS"):
        shutil.copy(shot, Path(os.environ["SIMSEARCH_SCREENSHOTS"]) / shot.name)

    # draw a box on the query image: the search reruns on that region, in the objects index (the demo has boxes),
    # and each card shows the box it matched, with its class, score and why
    box = page.locator("#qimg").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.7, steps=5)
    page.mouse.up()
    page.wait_for_function("document.getElementById('status').textContent.includes('region')")
    assert "objects index" in page.locator("#status").inner_text()
    first = page.locator(".card").first
    matched = first.locator("img.crop.matched")
    assert matched.count() == 1 and "/api/boxes/" in matched.get_attribute("src")
    assert first.locator(".match").inner_text().startswith("matched ")
    assert "~ your box (" in first.locator(".why").inner_text()
    page.wait_for_function("[...document.querySelectorAll('.card img.matched')].every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator(".card img.matched").count() == page.locator(".card").count()

    # clicking a neighbour searches from it
    second = cards.nth(1).get_attribute("data-id")
    cards.nth(1).click()
    page.wait_for_function(f"location.hash === '#id={second}' && document.querySelectorAll('.card').length > 0 "
                           f"&& document.getElementById('status').textContent.includes('whole image')")
    assert second not in [c.get_attribute("data-id") for c in page.locator(".card").all()]
    if os.environ.get("SIMSEARCH_SCREENSHOTS"):
        page.screenshot(path=str(Path(os.environ["SIMSEARCH_SCREENSHOTS"]) / "serve-by-id.png"), full_page=True)

    # the objects toggle searches with the query record's own boxes (the astronaut: a person and a helmet)
    astronaut = page.evaluate("fetch('/api/records?limit=500').then(r => r.json())"
                              ".then(p => p.records.find(r => r.name === 'astronaut.png').id)")
    page.fill("#rid", str(astronaut))
    page.click("#go")
    page.wait_for_function(f"location.hash === '#id={astronaut}' && "
                           "document.getElementById('status').textContent.includes('whole image')")
    page.check("#objects")
    page.wait_for_function("document.getElementById('status').textContent.includes('its 2 objects')")
    assert page.locator(".card img.matched").count() == page.locator(".card").count() > 0
    assert not errors, errors
    page.close()


def test_map_page_hover_and_click(browser, demo_index: Path, tmp_path: Path):
    from simsearch.views.maps import MapConfig, build_map

    build_map(demo_index, tmp_path / "map", MapConfig(method="tsne"))
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((tmp_path / "map" / "map.html").as_uri())
    point = page.evaluate("(() => { const p = P[0], [x, y] = xy(p); const b = canvas.getBoundingClientRect();"
                          " return [b.left + x / devicePixelRatio, b.top + y / devicePixelRatio]; })()")
    page.mouse.move(*point)
    page.wait_for_selector("#tip img", state="visible")
    page.mouse.click(*point)
    page.wait_for_selector("#side .nn")
    assert page.locator("#side .nn").count() == 8
    if os.environ.get("SIMSEARCH_SCREENSHOTS"):
        page.screenshot(path=str(Path(os.environ["SIMSEARCH_SCREENSHOTS"]) / "map.png"))
    assert not errors, errors
    page.close()


def _zip_rows(download, tmp_path: Path) -> tuple[zipfile.ZipFile, list[dict]]:
    """The downloaded archive and its results.csv rows."""
    import csv
    import io

    target = tmp_path / download.suggested_filename
    target.parent.mkdir(parents=True, exist_ok=True)
    download.save_as(target)
    archive = zipfile.ZipFile(target)
    assert archive.testzip() is None
    rows = list(csv.DictReader(io.StringIO(archive.read("results.csv").decode())))
    for row in rows:
        assert row["path"] in archive.namelist()  # every row's image is in the archive
    return archive, rows


def test_picker_pages_and_filters_the_library_and_results_download_as_a_zip(browser, library_index: Path,
                                                                               demo_data: Path, tmp_path: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    shown = lambda: sorted(i.get_attribute("title").split(": ", 1)[1] for i in page.locator("#picker img").all())
    settled = lambda text: page.wait_for_function(
        f"document.getElementById('pickpage').textContent === {text!r}")
    with _serving(library_index, picker_page=4) as url:
        page.goto(url + "/")
        settled("1–4 of 9")  # 9 images, 4 a page: the picker pages through all of them
        assert page.locator("#picker img").count() == 4 and page.locator("#pickprev").is_disabled()
        seen = shown()
        page.click("#picknext")
        settled("5–8 of 9")
        seen += shown()
        page.click("#picknext")
        settled("9–9 of 9")
        seen += shown()
        assert page.locator("#picknext").is_disabled() and not page.locator("#pickprev").is_disabled()
        assert sorted(seen) == sorted(n for names in LIBRARY_FOLDERS.values() for n in names)

        page.fill("#pickname", "MOTOR")  # by file name, from the first page again
        settled("1–2 of 2")
        assert shown() == ["motorcycle_left.png", "motorcycle_right.png"]
        page.fill("#pickname", "")
        settled("1–4 of 9")
        options = page.locator("#pickfolder option").all_inner_texts()
        assert options == ["all folders", "animals (3)", "people (3)", "things (3)", "things/vehicles (2)"]
        page.select_option("#pickfolder", "people")
        settled("1–3 of 3")
        page.select_option("#pickorient", "portrait")
        settled("1–1 of 1")
        assert shown() == ["grace_hopper.jpg"]
        page.select_option("#pickorient", "")
        page.select_option("#pickfolder", "things")
        settled("1–3 of 3")

        # pick one: its neighbours come back, and the ZIP holds them as the cards show them
        assert not page.locator("#export").is_visible()
        page.locator("#picker img[title$=': motorcycle_left.png']").click()
        page.wait_for_function("document.querySelectorAll('.card').length > 0")
        cards = [c.get_attribute("data-id") for c in page.locator(".card").all()]
        assert page.locator("#export").is_visible()
        with page.expect_download() as info:
            page.click("#export")
        archive, rows = _zip_rows(info.value, tmp_path)
        assert [r["id"] for r in rows] == cards
        assert rows[0]["path"] == "images/1-motorcycle_right.png"
        assert archive.read(rows[0]["path"]) == (demo_data / "images" / "motorcycle_right.png").read_bytes()

        # an upload's results download too (the form is posted again)
        page.set_input_files("#file", str(demo_data / "images" / "horse.png"))
        page.wait_for_function("document.getElementById('status').textContent.includes('neighbour') && "
                               "!document.getElementById('export').hidden")
        cards = [c.get_attribute("data-id") for c in page.locator(".card").all()]
        with page.expect_download() as info:
            page.click("#export")
        archive, rows = _zip_rows(info.value, tmp_path / "upload")
        assert [r["id"] for r in rows] == cards and len(rows) == 8  # 9 indexed, the upload's own copy left out
    assert not errors, errors
    page.close()


def test_api_docs_show_the_api_with_no_internet(browser, server):
    page = browser.new_page()
    outside: list[str] = []

    def local_only(route):
        if route.request.url.startswith(server):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    page.route("**/*", local_only)
    page.goto(server + "/docs")
    page.wait_for_function("[...document.querySelectorAll('.opblock-summary-path')]"
                           ".some(e => e.textContent.includes('/api/export'))", timeout=20_000)
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/api/search" in paths and "/api/records" in paths
    page.goto(server + "/redoc")
    page.wait_for_function("document.body.innerText.includes('/api/export')", timeout=20_000)
    page.close()
