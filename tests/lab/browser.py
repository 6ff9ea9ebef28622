"""A real browser for the dashboard tests: Debian's chromium, driven by its chromedriver through
Selenium, headless. Never Selenium Manager (it would download a driver): the driver and the
browser are named by path, and the browser is told to reach nothing but the pages it is sent to.

Screenshots go to $RUNNER_SCREENSHOTS, else <repo>/test-output/screenshots/.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[2]
WIDTH, HEIGHT = 1280, 900


def browser_available() -> str | None:
    """None when a browser can be started, else what is missing (the skip reason)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        return (f"{' and '.join(missing)} not installed (Debian's chromium and chromium-driver: "
                f"bash scripts/install-system installs them)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def start_browser():
    """A headless chromium (selenium webdriver.Chrome) that talks to nothing but what it is sent to.

    Its profile is a fresh temporary directory, removed by driver.quit()."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # Belt and braces: naming the driver in Service() already skips Selenium Manager; if it ever
    # ran anyway, it would be offline.
    os.environ.setdefault("SE_OFFLINE", "true")
    profile = tempfile.mkdtemp(prefix="runner-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={WIDTH},{HEIGHT}", f"--user-data-dir={profile}", "--no-proxy-server",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--no-default-browser-check", "--disable-default-apps",
                 "--disable-extensions", "--metrics-recording-only", "--disable-breakpad",
                 "--disable-client-side-phishing-detection", "--safebrowsing-disable-download-protection",
                 "--disable-domain-reliability", "--no-pings",
                 "--disable-features=Translate,OptimizationHints,MediaRouter"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"safebrowsing.enabled": False})
    # Selenium's own client reaches chromedriver on loopback: never through an HTTP(S)_PROXY from
    # the environment. Deprecated (for a ClientConfig), but webdriver.Chrome() takes no
    # ClientConfig (selenium 4.51), so this is still the way that reaches its connection.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        options.ignore_local_proxy_environment_variables()
    try:
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    except BaseException:
        shutil.rmtree(profile, ignore_errors=True)
        raise
    driver.set_page_load_timeout(30)
    quit_ = driver.quit

    def quit_and_clean() -> None:
        try:
            quit_()
        finally:
            shutil.rmtree(profile, ignore_errors=True)
    driver.quit = quit_and_clean  # type: ignore[method-assign]
    return driver


def screenshot_dir() -> Path:
    d = Path(os.environ.get("RUNNER_SCREENSHOTS") or REPO / "test-output" / "screenshots")
    d.mkdir(parents=True, exist_ok=True)
    return d


def screenshot(driver, name: str) -> Path:
    """The whole page as NAME.png in screenshot_dir(): the window is stretched for the shot so that
    its viewport holds the page's full height (the window at most 6000 px), then put back."""
    size = driver.get_window_size()
    content, viewport = driver.execute_script(
        "return [Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),"
        " window.innerHeight]")
    # Headless chromium's viewport is shorter than its window (by 143 px with chromium 156).
    frame = max(0, size["height"] - int(viewport))
    driver.set_window_size(size["width"], max(size["height"], min(int(content) + frame, 6000)))
    try:
        path = screenshot_dir() / f"{name}.png"
        driver.save_screenshot(str(path))
        return path
    finally:
        driver.set_window_size(size["width"], size["height"])


@contextlib.contextmanager
def phone(driver, width: int = 390):
    """Phone width for what happens inside (a screenshot at 390 px, as an iPhone's)."""
    size = driver.get_window_size()
    driver.set_window_size(width, 844)
    try:
        yield driver
    finally:
        driver.set_window_size(size["width"], size["height"])


def wait_for(driver, condition, timeout: float = 10, what: str = "the page", every: float = 0.05):
    """Poll `condition()` until it is truthy; else fail saying what was awaited, where, and what
    the page said."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            got = condition()
            if got:
                return got
        except Exception as exc:  # noqa: BLE001 - an element not there yet
            last_error = exc
        time.sleep(every)
    try:
        text = driver.find_element("tag name", "body").text[:1500]
    except Exception:  # noqa: BLE001
        text = "(no page)"
    raise AssertionError(f"timed out after {timeout}s waiting for {what} at {driver.current_url}"
                         f"{f' (last error: {last_error})' if last_error else ''}; the page says:\n{text}")
