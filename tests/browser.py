"""Open a local HTML page in headless Chromium and record what it loads (for the report's test).

:func:`visit` loads a page with every host name resolving to nothing
(``--host-resolver-rules``), so a request that would leave the machine fails instead of
reaching the network, and Chromium's performance log records it either way (every
``Network.requestWillBeSent``). Debian: ``apt-get install chromium chromium-driver``; the
Python side is selenium.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


def missing() -> str | None:
    """Why the browser cannot run here (``None`` when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not any(shutil.which(b) for b in CHROMIUM):
        return "no Chromium binary (apt-get install chromium chromium-driver)"
    if shutil.which(DRIVER) is None:
        return "no chromedriver (apt-get install chromium-driver)"
    return None


@dataclass
class Visit:
    """What one page did: the URLs it requested, its images that did not load, its links
    (resolved by the browser) and the element ids it has."""

    url: str
    requests: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    links: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)


def browser():
    """A headless Chromium under selenium, offline (module docstring)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--window-size=1280,2000",
    ):  # fmt: skip
        options.add_argument(arg)
    options.binary_location = next(shutil.which(b) for b in CHROMIUM if shutil.which(b))
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which(DRIVER)), options=options)


def visit(driver, page: Path, screenshot: Path | None = None) -> Visit:
    """Load ``page``, wait for it, and return what it did; with ``screenshot``, save a PNG of
    the whole page's height (up to 6000 px)."""
    driver.get_log("performance")  # drop what earlier pages logged
    driver.get(page.resolve().as_uri())
    driver.execute_async_script(
        "const done = arguments[0];"
        "if (document.readyState === 'complete') done(); else window.addEventListener('load', () => done());"
    )
    out = Visit(page.resolve().as_uri())
    images = driver.execute_script(
        "return Array.from(document.images).map(i => [i.src, i.complete && i.naturalWidth > 0])"
    )
    out.images = len(images)
    out.broken_images = [src for src, ok in images if not ok]
    out.links = driver.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"
    )
    out.ids = set(
        driver.execute_script("return Array.from(document.querySelectorAll('[id]')).map(e => e.id)")
    )
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            out.requests.append(message["params"]["request"]["url"])
    if screenshot is not None:
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(int(height), 6000))
        driver.save_screenshot(str(screenshot))
        driver.set_window_size(1280, 2000)
    return out


def local_target(url: str) -> tuple[Path, str] | None:
    """(file, fragment) of a ``file://`` URL; ``None`` for any other scheme."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    return Path(unquote(parts.path)), unquote(parts.fragment)
