"""Regenerate docs/images/gradio_demo.png: serve examples/gradio_app.py on a shipped model, generate one grid in
headless Chromium (needs the demo extra, selenium, chromium and chromedriver) and save a screenshot.

    python docs/gradio_screenshot.py [--model photos-32] [--color "#BB2266"] [--scale 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import shutil
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="photos-32")
    p.add_argument("--color", default="#BB2266")
    p.add_argument("--scale", type=float, default=None, help="default: the app's default scale")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "gradio_demo.png"))
    args = p.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    spec = importlib.util.spec_from_file_location("gradio_app", ROOT / "examples" / "gradio_app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    kwargs = {} if args.scale is None else {"default_scale": args.scale}
    models = {name: app.load_model(name) for name in dict.fromkeys([args.model, *app.available_models()])}
    demo = app.build_demo(*models[args.model], models=models, **kwargs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,900", "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(f"http://127.0.0.1:{port}/")
        wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "#color button"))).click()
        field = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#color input[type=text]")))
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(args.color, Keys.ENTER)
        driver.find_element(By.TAG_NAME, "h1").click()
        driver.find_element(By.ID, "generate").click()
        wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, "#output img")))
        wait.until(lambda d: "mean" in d.find_element(By.CSS_SELECTOR, "#summary textarea").get_attribute("value"))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(args.out)
        print(f"wrote {args.out}")
    finally:
        driver.quit()
        demo.close()


if __name__ == "__main__":
    main()
