"""The Gradio demo in a real browser: headless Chromium opens the page, sets a colour, clicks generate
and receives an image (a tiny random model and 2 steps keep it fast)."""
from __future__ import annotations

import importlib.util
import shutil
import socket
from pathlib import Path

import pytest
import torch

import minidiff
from conftest import TINY

APP = Path(__file__).resolve().parents[2] / "examples" / "gradio_app.py"
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1280,1600"]


def _browser_or_skip() -> tuple[str, str]:
    missing = [name for name in ("gradio", "selenium") if importlib.util.find_spec(name) is None]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    missing += [] if chromium else ["chromium (Debian package chromium)"]
    missing += [] if chromedriver else ["chromedriver (Debian package chromium-driver)"]
    if missing:
        pytest.skip(f"the browser test needs {', '.join(missing)}")
    return chromium, chromedriver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_app():
    spec = importlib.util.spec_from_file_location("gradio_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def app_url():
    _browser_or_skip()
    torch.manual_seed(0)
    unet = minidiff.UNet.from_config(TINY).eval()
    demo = _load_app().build_demo(unet, minidiff.DDIMScheduler(), batch_size=1, default_steps=2)
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)  # its own thread
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = _browser_or_skip()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.browser
@pytest.mark.slow
def test_pick_a_colour_generate_and_receive_an_image(app_url, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(app_url)
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#color button"))).click()   # opens the picker
    hex_field = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#color input[type=text]")))
    hex_field.send_keys(Keys.CONTROL, "a")
    hex_field.send_keys("#BB2266", Keys.ENTER)
    browser.find_element(By.TAG_NAME, "h1").click()                                      # closes it
    browser.find_element(By.ID, "generate").click()

    image = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#output img")))
    assert image.get_attribute("src")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
    summary = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#summary textarea").get_attribute("value"))
    assert summary.startswith("#bb2266") and "2 steps" in summary
