"""The browser harness itself: it sees console errors and requests leaving the page, and saves
screenshots; a quiet page served from loopback that fetches its own origin passes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.browser.conftest import Browser, start_chromium

NOISY = """<!doctype html><title>noisy</title><p>noisy</p><script>
console.error('boom'); console.warn('careful'); console.info('just so you know');
fetch('http://127.0.0.1:9/elsewhere').catch(() => {});
</script>"""
QUIET = """<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>quiet</title></head><body><p id="n">-</p><script>
fetch('/data').then(r => r.text()).then(t => { document.getElementById('n').textContent = t; });
</script></body></html>"""


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = QUIET.encode() if self.path == "/" else b"42"
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if self.path == "/" else "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def quiet_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join(5)


def test_console_errors_outside_requests_and_screenshots(tmp_path: Path, quiet_server: str):
    driver = start_chromium()
    try:
        noisy = Browser(driver, tmp_path / "noisy")
        page = tmp_path / "noisy.html"
        page.write_text(NOISY)
        noisy.open(page.as_uri(), label="noisy")
        noisy.wait("performance.getEntriesByType('resource').length > 0", "the fetch")
        problems = " | ".join(noisy.problems())
        assert "boom" in problems and "careful" in problems, problems
        assert "just so you know" not in problems
        assert noisy.outside_requests() == [f"http://127.0.0.1:9/elsewhere (from {page.as_uri()})"]
        with pytest.raises(AssertionError, match="console errors/warnings"):
            noisy.assert_quiet()
        shots = sorted((tmp_path / "noisy").glob("*.png"))
        assert [s.name for s in shots] == ["01-noisy.png"]
        assert shots[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        quiet = Browser(driver, tmp_path / "quiet")
        quiet.collect()  # the noisy page's leftovers
        quiet.console.clear()
        quiet.requests.clear()
        quiet.open(quiet_server, label="quiet")
        quiet.wait("document.getElementById('n').textContent === '42'", "the same-origin fetch")
        quiet.assert_quiet()
        assert (quiet_server + "data") in [url for _, url in quiet.requests]
    finally:
        driver.quit()
