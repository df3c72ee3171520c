"""A headless Chromium for the tests, driven through chromedriver's W3C WebDriver protocol (spoken with `requests`)."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from support.gateways import free_port
from support.waiting import wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


class WebDriver:
    """Just enough of the W3C WebDriver protocol to drive one page: find, type, click, read."""

    def __init__(self, endpoint: str, session: str) -> None:
        self.base = f"{endpoint}/session/{session}"

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        response = requests.post(f"{self.base}{path}", json=payload, timeout=60)
        assert response.status_code == 200, response.text[:2000]
        return response.json()["value"]

    def open(self, url: str) -> None:
        self._post("/url", {"url": url})

    def element(self, css: str) -> str:
        reference = self._post("/element", {"using": "css selector", "value": css})
        return next(iter(reference.values()))  # {"element-6066-…": id}: the key is the spec's constant

    def type(self, css: str, text: str) -> None:
        self._post(f"/element/{self.element(css)}/value", {"text": text})

    def clear(self, css: str) -> None:
        self._post(f"/element/{self.element(css)}/clear", {})

    def click(self, css: str) -> None:
        self._post(f"/element/{self.element(css)}/click", {})

    def value(self, element_id: str) -> str:
        return self._post("/execute/sync", {"script": "return document.getElementById(arguments[0]).dataset.value",
                                            "args": [element_id]})

    def hidden(self, element_id: str) -> bool:
        return self._post("/execute/sync", {"script": "return document.getElementById(arguments[0]).hidden",
                                            "args": [element_id]})

    def run_async(self, script: str, *args: object) -> Any:
        """Run `script` in the page; it ends by calling its last argument with the result."""
        return self._post("/execute/async", {"script": script, "args": list(args)})

    def fetch_status(self, path: str) -> int:
        """The HTTP status the page gets for `path`, fetched as the page fetches (with what the browser holds)."""
        return self._post("/execute/async", {"script": (
            "const done = arguments[arguments.length - 1];"
            "fetch(new URL(arguments[0], location.origin + location.pathname)).then((r) => done(r.status));"),
            "args": [path]})

    def wait_for(self, element_id: str, value: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (seen := self.value(element_id)) != value:
            assert time.monotonic() < deadline, f"#{element_id} shows {seen!r}, not {value!r}"
            time.sleep(0.1)


@contextmanager
def webdriver(tmp_path: Path) -> Iterator[WebDriver]:
    port = free_port()
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _answers(f"{endpoint}/status"), timeout=20)
        options = {"binary": CHROMIUM, "args": [*FLAGS, f"--user-data-dir={tmp_path / 'webdriver-profile'}"]}
        created = requests.post(f"{endpoint}/session", json={"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}}, timeout=60)
        assert created.status_code == 200, created.text[:2000]
        session = created.json()["value"]["sessionId"]
        try:
            yield WebDriver(endpoint, session)
        finally:
            requests.delete(f"{endpoint}/session/{session}", timeout=30)
    finally:
        driver.terminate()
        driver.wait(10)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False
