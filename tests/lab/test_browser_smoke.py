"""The browser tests' own plumbing (tests/lab/browser.py): the session's headless chromium opens a
page served on loopback, runs its script on a click, and a screenshot of it is a PNG. Needs no lab.
"""
from __future__ import annotations

import http.server
import threading

import pytest

from tests.lab.browser import screenshot, wait_for

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>browser smoke</title>
<style>body { font: 18px sans-serif; margin: 2em; } #out { color: #0a6; font-weight: bold; }</style>
</head><body>
<h1>runner: browser smoke test</h1>
<p id="out">not clicked</p>
<button id="go" onclick="document.getElementById('out').textContent = 'clicked by chromium'">Click</button>
</body></html>
"""


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def page_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_a_click_runs_the_pages_script_and_the_screenshot_is_a_png(browser, page_url):
    browser.get(page_url)
    assert browser.find_element("id", "out").text == "not clicked"
    browser.find_element("id", "go").click()
    wait_for(browser, lambda: browser.find_element("id", "out").text == "clicked by chromium",
             what="the button's script to change the text")
    path = screenshot(browser, "browser-smoke")
    assert path.is_file(), path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
