"""app.py, the web demo, in a real browser: it serves the small demo run on a free local port, headless Chromium
(Debian's chromium and chromium-driver, driven by Selenium) uploads a photo of the run's test split, and the page
shows the caption caption_images.py writes for it, the base model's beside it (``--compare``), and a caption with a
shorter length set on the page. A screenshot of the page is saved in the test's tmp folder. Skipped, saying why,
where no Chromium is installed (``make test`` installs it when it can: Makefile, target ``browser``)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

import caption_images
from app import build_parser, run_test_images
from captioning.arguments import to_argv
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
STARTUP_LIMIT_S = 180
CAPTION_WAIT_S = 120
EXIF_ORIENTATION = 0x0112

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="no Chromium: install Debian's chromium and chromium-driver (`make browser` does, as root with apt-get)",
)


@contextmanager
def serving(argv: list[str], log: Path):
    """``python app.py ARGV`` on a free port until the block ends; yields its URL once it answers. A start that
    fails or takes longer than STARTUP_LIMIT_S fails the test with the app's output."""
    port = free_port()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "app.py", *argv, "--port", str(port)], cwd=ROOT, stdout=output, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_LIMIT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"app.py did not answer within {STARTUP_LIMIT_S} s:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def caption_of(model: Path, image: Path, output: Path, *flags: str) -> str:
    caption_images.main(["--model", str(model), "--images", str(image), "--output", str(output), *flags])
    return json.loads(output.read_text())["caption"]


def test_the_runs_test_images_are_the_default_examples(small_demo, tmp_path):
    data = small_demo.build / "data"
    lines = [json.loads(line) for line in (small_demo.output / "predictions.jsonl").read_text().splitlines()]
    assert run_test_images(str(small_demo.output)) == [str(data / line["image"]) for line in lines]
    assert run_test_images(str(tmp_path)) == []  # not a run: no examples
    assert build_parser().parse_args(["--model", "m"]).host == "127.0.0.1"  # served to this machine only


@needs_browser
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_uploaded_photo_is_captioned_in_the_browser_as_caption_images_does(small_demo, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    output, data = small_demo.output, small_demo.build / "data"
    test_images = [data / json.loads(line)["image"] for line in (output / "predictions.jsonl").read_text().splitlines()]
    # A photo stored sideways (EXIF orientation 6) where the test split has one: the page must turn it upright too.
    image = next((p for p in test_images if Image.open(p).getexif().get(EXIF_ORIENTATION, 1) != 1), test_images[0])
    settings = json.loads((output / "captioning_config.json").read_text())["generation"]
    expected = caption_of(output, image, tmp_path / "fine-tuned.jsonl")
    base_flags = to_argv(caption_prompt="", **settings)  # the base model with the run's prompt and settings
    expected_base = caption_of(small_demo.build / "model", image, tmp_path / "base.jsonl", *base_flags)
    expected_short = caption_of(output, image, tmp_path / "short.jsonl", "--max_new_tokens", "3")
    assert expected != expected_base and expected != expected_short  # the three checks below can tell them apart

    def texts(driver) -> tuple[str, str]:
        boxes = ("#caption textarea", "#base-caption textarea")
        return tuple(driver.find_element(By.CSS_SELECTOR, box).get_attribute("value") for box in boxes)

    with serving(["--model", str(output), "--compare"], tmp_path / "app.log") as url:
        browser.get(url)
        wait = WebDriverWait(browser, CAPTION_WAIT_S)
        upload = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "input[type=file]"))
        assert "Test images of the run" in browser.page_source
        upload.send_keys(str(image))
        captions = wait.until(lambda driver: texts(driver) if all(texts(driver)) else None)
        assert captions == (expected, expected_base)
        shown = browser.find_element(By.CSS_SELECTOR, "#image img")
        assert browser.execute_script("return arguments[0].naturalWidth", shown) > 0  # the uploaded photo is shown
        browser.save_screenshot(str(tmp_path / "app.png"))

        browser.find_element(By.XPATH, "//button[contains(., 'Generation settings')]").click()
        length = wait.until(
            lambda driver: driver.find_element(By.CSS_SELECTOR, "input[type=number][aria-label*='Longest caption']")
        )
        length.send_keys(Keys.CONTROL, "a")
        length.send_keys("3", Keys.ENTER)
        browser.find_element(By.XPATH, "//button[contains(., 'Caption again')]").click()
        assert wait.until(lambda driver: texts(driver)[0] if texts(driver)[0] == expected_short else None)
    with Image.open(tmp_path / "app.png") as screenshot:
        assert screenshot.size == (1280, 900) or screenshot.width >= 1000
