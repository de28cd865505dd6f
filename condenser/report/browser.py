"""The system's headless Chromium (Debian packages `chromium` and `chromium-driver`) driven with Selenium: one
setup (`chromium`) for every page we look at, the report's (`open_in_browser`: its visible text, and a screenshot
of the whole page up to a height cap) and the Prefect UI's (flows/ui.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver",)
WIDTH = 1280
HEIGHT = 900
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


def require_chromium() -> tuple[str, str]:
    """Chromium's and chromedriver's paths, without starting them; BrowserMissing names the package missing."""
    return _find(CHROMIUM, "chromium", "chromium"), _find(CHROMEDRIVER, "chromedriver", "chromium-driver")


@contextmanager
def chromium(width: int = WIDTH, height: int = HEIGHT) -> Iterator:
    """A headless Chromium WebDriver with a `width` x `height` window, quit when the block ends. Raises
    BrowserMissing when Chromium or chromedriver is not installed."""
    binary, driver_path = require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: the sandbox needs user namespaces, which containers and root sessions lack.
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def save_full_page(driver, screenshot: Path, scroller: str | None = None, max_height: int = MAX_HEIGHT,
                   ready: Callable[[], object] | None = None) -> Path:
    """Save a PNG of the whole page: the window grows until its scrolling element shows everything (capped at
    `max_height` pixels). That element is the document, or the CSS selector `scroller` for a single-page app that
    scrolls inside an element of viewport height. `ready`, if given, is called once the window has grown: to wait
    for what a page renders only when it is in view."""
    # How much of the element lies below its visible part. The document's visible part is the viewport (in quirks
    # mode the root element's clientHeight is the whole page's).
    hidden = driver.execute_script(
        f"const e = document.querySelector({scroller!r}); return e ? e.scrollHeight - e.clientHeight : 0" if scroller
        else "return document.documentElement.scrollHeight - window.innerHeight")
    # The window's outer height includes the browser's frame, so it grows by exactly what the element hides.
    size = driver.get_window_size()
    driver.set_window_size(size["width"], min(size["height"] + max(hidden, 0), max_height))
    if ready is not None:
        ready()
    Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(screenshot))
    return Path(screenshot)


def open_in_browser(html: Path, screenshot: Path | None = None) -> str:
    """Load `html` (file://) in headless Chromium and return the page's visible text; with `screenshot`, save a
    PNG of the page at its full scroll height (capped at MAX_HEIGHT pixels)."""
    from selenium.webdriver.common.by import By

    with chromium(WIDTH, HEIGHT) as driver:
        driver.get(Path(html).resolve().as_uri())
        text = driver.find_element(By.TAG_NAME, "body").text
        if screenshot is not None:
            save_full_page(driver, screenshot)
        return text
