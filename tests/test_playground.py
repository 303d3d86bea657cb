"""The playground (GET /) in a real browser: Debian's chromium through chromedriver (selenium).
Types a sentence, waits for its translation, checks the heatmap against the /v1 API (one row per
target subword, one column per source subword), keyboard navigation, the PNG download, and that
the page fits a phone-width screen. ATTNSERVE_SCREENSHOTS=1 writes docs/playground-*.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.test_http import call
from tests.test_server import free_port, shipped_repository, start

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
SENTENCE = "Could not open the file."


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    http_port = free_port()
    server, _ = start(shipped_repository(tmp_path_factory), http_port=http_port)
    yield http_port
    server.stop(1)


def test_playground_translates_as_you_type_and_shows_the_attention(browser, gateway, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.set_window_size(1280, 900)
    browser.get(f"http://127.0.0.1:{gateway}/")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    source = browser.find_element(By.ID, "source")
    source.send_keys(SENTENCE)
    wait.until(lambda d: int(d.find_element(By.ID, "heatmap").get_attribute("data-rows")) > 0)

    expected = call(gateway, "/v1/translate", {"sentences": [SENTENCE], "options": {"textFormat": "DOCUMENT"}})[1]
    shown = browser.find_element(By.CSS_SELECTOR, "#translation .segment .text").text
    assert shown == expected["translations"][0]["hypotheses"][0]["text"]
    assert "confidence" in browser.find_element(By.CSS_SELECTOR, "#translation .segment .confidence").text
    analysis = call(gateway, "/v1/translate", {"sentences": [SENTENCE],
                                               "options": {"beamSize": 4, "nbest": 3, "returnAlignment": True}})[1]
    translation = analysis["translations"][0]
    rows = browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr")
    columns = browser.find_elements(By.CSS_SELECTOR, "#heatmap thead th.src")
    assert len(rows) == len(translation["hypotheses"][0]["targetTokens"])
    assert len(columns) == len(translation["sourceTokens"])
    assert [c.get_attribute("textContent") for c in columns] == translation["sourceTokens"]
    assert all(len(r.find_elements(By.TAG_NAME, "td")) == len(columns) for r in rows)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#nbest li")) == len(translation["hypotheses"])

    # Keyboard: focus the first row, arrow down, and the second row's source words light up.
    browser.execute_script("document.querySelector('#heatmap tbody tr').focus()")
    browser.switch_to.active_element.send_keys(Keys.ARROW_DOWN)
    assert browser.switch_to.active_element.get_attribute("data-row") == "1"
    assert browser.find_elements(By.CSS_SELECTOR, "#heatmap tbody tr.active[data-row='1']")
    assert browser.find_elements(By.CSS_SELECTOR, "#source-tokens span.attended")

    # The PNG download: capture the blob the button hands to the browser.
    png = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const original = URL.createObjectURL;
        URL.createObjectURL = (blob) => { blob.arrayBuffer().then((b) => done([blob.type, b.byteLength])); return original(blob); };
        document.getElementById('download').click();""")
    assert png[0] == "image/png" and png[1] > 1000

    screenshots = ROOT / "docs" if os.environ.get("ATTNSERVE_SCREENSHOTS") == "1" else tmp_path
    browser.save_screenshot(str(screenshots / "playground-desktop.png"))
    browser.set_window_size(390, 844)
    overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
    browser.save_screenshot(str(screenshots / "playground-phone.png"))
