"""`diffsr ui` end to end in a real headless browser (Debian's Chromium, driven by playwright).

The fast test serves the app in this process with a stand-in model (bicubic, so the browser side is what is
timed); the slow one starts `diffsr ui` itself with the tiny random OSEDiff, as a user would.
"""

import io
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ui_helpers import StandIn

pytest.importorskip("gradio", reason='the web app needs gradio: pip install "diffsr[ui]"')
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test drives Chromium with playwright "
                                                             "(pip install playwright; no `playwright install` needed)")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt-get install chromium); the "
                                                         "web app is checked in a real browser only where one is installed")
# both images of the before/after slider have arrived and decoded
LOADED = """() => { const shown = [...document.querySelectorAll('#result img')];
                    return shown.length === 2 && shown.every(i => i.complete && i.naturalWidth > 0); }"""
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, seconds: float = 120, process=None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"diffsr ui exited: {process.stdout.read()}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {seconds} s")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def images(tmp_path):
    rng = np.random.RandomState(0)
    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.fromarray(rng.randint(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / "photo.png")
    deep = (rng.randint(0, 65536, (20, 28, 3))).astype(np.uint16)
    import cv2

    cv2.imwrite(str(folder / "deep.png"), deep[..., ::-1])  # 16-bit RGB PNG
    (folder / "notes.txt").write_text("this is not an image")
    return folder


@pytest.fixture
def served(tmp_path):
    from diffsr.ui.app import launch
    from diffsr.ui.service import ModelCache

    model = StandIn()
    models = ModelCache(bases={}, default_base=str(tmp_path), load=model.load)
    port = free_port()
    app = launch(models, {"osediff": str(tmp_path / "osediff.pkl")}, port=port, output=tmp_path / "results",
                 block=False)
    url = f"http://127.0.0.1:{port}"
    wait_for_server(url)
    yield url, model, tmp_path / "results"
    app.close()


def new_page(browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(90_000)  # a busy machine (CI, other tests) can be slow to render and answer
    return page


def open_app(page, url):
    page.goto(url)
    page.get_by_role("button", name="Upscale", exact=True).wait_for(timeout=60_000)  # the app has rendered


def upload(page, files, tries: int = 3) -> None:
    """Upload into the image box; tried again when a freshly rendered page dropped it (a busy machine)."""
    for attempt in range(tries):
        page.locator("input[type=file]").first.set_input_files([str(f) for f in files])
        try:
            page.get_by_text(files[0].name).first.wait_for(timeout=20_000)
            return
        except sync_api.TimeoutError:
            if attempt == tries - 1:
                raise


def upscale_in(page, url, files, prompt=None):
    open_app(page, url)
    upload(page, files)
    if prompt is not None:
        page.get_by_label("prompt").fill(prompt)
    page.get_by_role("button", name="Upscale", exact=True).click()


def download(page, link) -> bytes:
    with page.expect_download() as info:
        link.click()
    return Path(info.value.path()).read_bytes()


def test_upscale_download_bad_input_and_two_at_once(browser, served, images):
    url, model, results = served
    page = new_page(browser)
    upscale_in(page, url, [images / "photo.png", images / "deep.png"], prompt="a sharp photo")
    page.locator("#status").get_by_text("2 written").wait_for(timeout=60_000)

    shown = page.locator("#result img")
    page.wait_for_function(LOADED)
    assert shown.count() == 2  # before and after, each at the output size (4 x 32x24)
    assert [shown.nth(i).evaluate("i => [i.naturalWidth, i.naturalHeight]") for i in range(2)] == [[128, 96]] * 2
    upscales = [c for c in model.calls if c[0] == "upscale"]
    assert {c[1] for c in upscales} == {"photo.png", "deep.png"}
    assert all(c[3] == {"prompt": "a sharp photo"} for c in upscales)  # the method control reached the model

    links = page.locator("#downloads a")
    names = [links.nth(i).get_attribute("href").rsplit("/", 1)[1] for i in range(links.count())]
    assert sorted(names) == ["deep.png", "deep.png.json", "photo.png", "photo.png.json"]
    files = {name: download(page, links.nth(i)) for i, name in enumerate(names)}
    written = {p.name: p for p in results.rglob("*") if p.is_file()}
    assert files["deep.png"] == written["deep.png"].read_bytes()  # the full-resolution file itself
    import cv2

    deep = cv2.imread(str(written["deep.png"]), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint16 and deep.shape == (80, 112, 3)  # input's bit depth, 4 x 28x20
    assert Image.open(io.BytesIO(files["photo.png"])).size == (128, 96)
    settings = json.loads(files["photo.png.json"])
    assert settings["method"] == "osediff" and settings["knobs"] == {"prompt": "a sharp photo"}
    assert "--prompt 'a sharp photo'" in settings["command"]

    # A file that is not an image: one clear message, and the app keeps working.
    upscale_in(page, url, [images / "notes.txt"])
    page.get_by_text("notes.txt: not an image").first.wait_for(timeout=60_000)

    # Two requests at once (two users): both complete, one after the other on the one device.
    other = new_page(browser)
    before = len([c for c in model.calls if c[0] == "upscale"])
    for p in (page, other):
        open_app(p, url)
        upload(p, [images / "photo.png"])
    for p in (page, other):
        p.get_by_role("button", name="Upscale", exact=True).click()
    for p in (page, other):
        p.locator("#status").get_by_text("1 written").wait_for(timeout=60_000)
    assert len([c for c in model.calls if c[0] == "upscale"]) == before + 2
    assert model.most_at_once == 1
    assert [c for c in model.calls if c[0] == "load"] == [("load", "osediff", str(results.parent / "osediff.pkl"))]


@pytest.mark.slow
def test_diffsr_ui_with_the_tiny_osediff(browser, tmp_path, images, tiny_base, osediff_weights):
    """`diffsr ui` as a user starts it, the real (tiny random) OSEDiff behind it (a minute or two on a CPU)."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "diffsr.cli", "ui", "--port", str(port), "--base", str(tiny_base),
                               "--weights", f"osediff={osediff_weights}", "--offline", "-o", str(tmp_path / "out")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_server(url, process=server)
        page = new_page(browser)
        upscale_in(page, url, [images / "photo.png"], prompt="a photo")
        page.locator("#status").get_by_text("1 written").wait_for(timeout=300_000)
        shown = page.locator("#result img")
        page.wait_for_function(LOADED)
        assert shown.nth(1).evaluate("i => [i.naturalWidth, i.naturalHeight]") == [128, 96]
        link = page.locator("#downloads a").first
        assert Image.open(io.BytesIO(download(page, link))).size == (128, 96)
        upscale_in(page, url, [images / "notes.txt"])
        page.get_by_text("notes.txt: not an image").first.wait_for(timeout=60_000)
        assert server.poll() is None  # still serving
    finally:
        server.terminate()
        server.wait(timeout=30)
