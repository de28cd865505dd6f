"""Open the report in the system's headless Chromium (Debian packages `chromium` and `chromium-driver`) with
Selenium: the page's visible text, and a screenshot of the whole page up to a height cap."""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver",)
WIDTH = 1280
# Chromium refuses very tall windows; a longer page is cut at this height.
MAX_HEIGHT = 16000


class BrowserMissing(RuntimeError):
    """Chromium or its WebDriver is not installed here."""


def _find(candidates: tuple[str, ...], name: str, package: str) -> str:
    for c in candidates:
        if Path(c).is_file():
            return c
    found = shutil.which(name)
    if found:
        return found
    raise BrowserMissing(f"{name} not found ({', '.join(candidates)} nor on PATH); install the Debian package "
                         f"'{package}'")


def open_in_browser(html: Path, screenshot: Path | None = None) -> str:
    """Load `html` (file://) in headless Chromium and return the page's visible text; with `screenshot`, save a
    PNG of the page at its full scroll height (capped at MAX_HEIGHT pixels)."""
    binary = _find(CHROMIUM, "chromium", "chromium")
    driver_path = _find(CHROMEDRIVER, "chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: the sandbox needs user namespaces, which containers and root sessions lack.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},900", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(Path(html).resolve().as_uri())
        text = driver.find_element(By.TAG_NAME, "body").text
        if screenshot is not None:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            # The window's outer height includes the browser's frame: add it so the viewport holds the page.
            frame = driver.get_window_size()["height"] - driver.execute_script("return window.innerHeight")
            driver.set_window_size(WIDTH, min(height + frame, MAX_HEIGHT))
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
        return text
    finally:
        driver.quit()
