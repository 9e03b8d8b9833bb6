"""Take the README's screenshots of `diffsr ui` and of the benchmark report, in headless Chromium (playwright).

    python docs/make_screenshots.py        # needs diffsr[ui], playwright and a system Chromium

The app runs the tiny random test models offline, so its results are noise-like: the pictures show the app,
not an upscaler. The report is examples/benchmark-tiny/report.html (make_example.py beside it).
"""

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import TimeoutError, sync_playwright

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "src" / "diffsr" / "data" / "example.png"
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer")


def main() -> int:
    from diffsr.testing import make_tiny_base, make_tiny_weights

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with tempfile.TemporaryDirectory() as scratch, sync_playwright() as playwright:
        scratch = Path(scratch)
        base = make_tiny_base(scratch / "base")
        osediff = make_tiny_weights("osediff", base, scratch / "osediff.pkl")
        ccsr = make_tiny_weights("ccsr", base, scratch / "ccsr-v2")
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "diffsr.cli", "ui", "--port", str(port), "--base", str(base),
                                   "--weights", f"osediff={osediff}", "--weights", f"ccsr={ccsr}", "--offline",
                                   "-o", str(scratch / "out")])
        try:
            url = f"http://127.0.0.1:{port}"
            wait_for(url)
            browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_role("button", name="Upscale", exact=True).wait_for(timeout=120_000)
            for attempt in range(3):  # a page that has just rendered may drop the first upload on a busy machine
                page.locator("input[type=file]").first.set_input_files(str(EXAMPLE))
                try:
                    page.get_by_text(EXAMPLE.name).first.wait_for(timeout=30_000)
                    break
                except TimeoutError:
                    if attempt == 2:
                        raise
            page.get_by_role("button", name="Upscale", exact=True).click()
            page.locator("#status").get_by_text("1 written").wait_for(timeout=600_000)
            page.wait_for_function("() => [...document.querySelectorAll('#result img')].filter(i => i.complete && "
                                   "i.naturalWidth > 0).length === 2")
            page.wait_for_timeout(3000)  # the result's fade-in
            page.screenshot(path=str(HERE / "ui-upscale.png"), full_page=True)

            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare-image input[type=file]").set_input_files(str(EXAMPLE))
            page.get_by_role("button", name="Compare", exact=True).click()
            page.locator("#compare .panel").nth(2).wait_for(timeout=600_000)
            page.locator("#compare .view").nth(1).click(position={"x": 60, "y": 60})  # shared zoom
            page.screenshot(path=str(HERE / "ui-compare.png"), full_page=True)

            report = browser.new_page(viewport={"width": 1400, "height": 1000})
            report.goto((ROOT / "examples" / "benchmark-tiny" / "report.html").as_uri())
            report.wait_for_timeout(1000)
            report.screenshot(path=str(HERE / "report.png"), full_page=True)
            browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    for name in ("ui-upscale.png", "ui-compare.png", "report.png"):
        print(HERE / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
