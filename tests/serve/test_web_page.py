"""The web page in headless Chromium (Debian's `chromium`, driven by Playwright): upload an image, wait for the
overlays of every checked method, check they are drawn and that the top-5 classes are listed."""
from __future__ import annotations

import shutil

import pytest
from helpers import scene_png

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def page(server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (test extra)")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = browser.new_page()
        pg.goto(server + "/", wait_until="domcontentloaded")
        yield pg
        browser.close()


def test_upload_shows_overlays_and_classes(page, tmp_path):
    page.wait_for_selector("#methods input", timeout=30_000)
    checked = page.eval_on_selector_all("#methods input:checked", "els => els.map(e => e.value)")
    assert len(checked) >= 2
    path = tmp_path / "digit.png"
    path.write_bytes(scene_png(0))
    page.set_input_files("#file", str(path))
    page.wait_for_function(f"document.querySelectorAll('figure.overlay').length === {len(checked)}",
                           timeout=60_000)
    assert sorted(page.eval_on_selector_all("figure.overlay", "els => els.map(e => e.dataset.method)")) == \
        sorted(checked)
    # every overlay canvas has structure: many distinct colours, not one flat fill
    distinct = page.eval_on_selector_all("figure.overlay canvas", """cs => cs.map(c => {
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data, seen = new Set();
        for (let i = 0; i < d.length; i += 4 * 7) seen.add(d[i] << 16 | d[i + 1] << 8 | d[i + 2]);
        return seen.size; })""")
    assert all(n > 50 for n in distinct), distinct
    items = page.eval_on_selector_all("#predictions li", "els => els.map(e => e.textContent)")
    assert len(items) == 5 and all("%" in t for t in items)
    assert page.text_content("#status").startswith("done")
    # choosing another class re-explains with it
    second = page.eval_on_selector_all("#predictions li", "els => els.map(e => e.dataset.cls)")[1]
    page.click("#predictions li:nth-child(2)")
    page.wait_for_function(f"[...document.querySelectorAll('figure.overlay figcaption')]"
                           f".every(f => f.textContent.includes('class {second}'))", timeout=60_000)
    assert page.get_attribute("figure.overlay a", "download").endswith(f"class{second}.json")
