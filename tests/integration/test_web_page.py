"""The web page at GET / in a real browser: headless Chromium (Debian's, driven by selenium through Debian's
chromedriver; nothing downloads a browser) types a text and a schema, clicks Extract, and the page shows the
JSON, the value found in the text highlighted, and the value that is not there flagged. Saves a screenshot."""
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import ROOT

PORT = 8016
URL = f"http://127.0.0.1:{PORT}"
# Patterns make even the untrained test model write known values: "paris" is in the text, "tokyo" is not.
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "pattern": "^paris$"},
                                           "destination": {"type": "string", "pattern": "^tokyo$"}},
          "required": ["city", "destination"], "additionalProperties": False}


def chromium() -> tuple[str, str]:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "install_chromium.sh")], capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0:
            pytest.skip(f"no Chromium here and it cannot be installed: {r.stderr.strip()[-300:]}")
    return shutil.which("chromium"), shutil.which("chromedriver")


def chromium_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("org.chromium.Chromium.*")}


@pytest.fixture(scope="module")
def app(ray_session, tiny_model):
    from ray import serve
    from serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(build_app({"model": {"name": str(tiny_model), "max_length": 256},
                         "schema": str(ROOT / "data" / "snips" / "schema.json"), "decoding": {"max_new_tokens": 40}}),
              name="page", route_prefix="/")
    yield URL
    serve.shutdown()


def test_page_extracts_and_highlights_in_a_real_browser(app, tmp_path):
    browser, driver_path = chromium()
    os.environ["SE_OFFLINE"] = "true"  # selenium must not fetch a driver or a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(arg)
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    # Chromium puts its single-instance socket in a folder of the temporary directory that it leaves behind when
    # chromedriver ends it: TMPDIR keeps that folder in the test's own.
    service = Service(driver_path, env=dict(os.environ, TMPDIR=str(tmp_path)))
    before = chromium_folders()
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        driver.get(URL + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "schema").get_attribute("value").strip())  # the default schema
        text = driver.find_element(By.ID, "text")
        text.clear()
        text.send_keys("We fly from Paris tomorrow morning.")
        schema = driver.find_element(By.ID, "schema")
        schema.clear()
        driver.execute_script("arguments[0].value = arguments[1]", schema, json.dumps(SCHEMA))
        driver.find_element(By.ID, "extract").click()
        wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-done") == "1"
                   or "error" in d.find_element(By.ID, "status").get_attribute("innerHTML"))
        status = driver.find_element(By.ID, "status").text
        assert status.startswith("valid"), status
        assert json.loads(driver.find_element(By.ID, "json").text) == {"city": "paris", "destination": "tokyo"}
        mark = driver.find_element(By.CSS_SELECTOR, 'mark[data-path="city"]')
        assert mark.text == "Paris" and "normalized" in mark.get_attribute("class")  # case differs: normalised
        assert "city" in mark.get_attribute("title")
        flagged = driver.find_elements(By.CSS_SELECTOR, 'tr[data-ungrounded="destination"]')
        assert len(flagged) == 1 and "not in the text" in flagged[0].text
        assert "prompt" in status and "ms on the server" in status
        shot = ROOT / "artifacts" / "web_page.png"
        shot.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()
    assert chromium_folders() <= before, chromium_folders() - before  # nothing left in the temporary directory
