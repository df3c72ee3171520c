"""The operators' status page (GET /), rendered by a real headless Chromium, behind OPS_TOKENS.

The first test reads the page as Chromium leaves it after polling; the second
drives it like an operator (through chromedriver's W3C WebDriver protocol, spoken
with `requests`): look a device up, kick it, give the API token when asked, then ban it,
see it listed, and lift the ban.
"""

from __future__ import annotations

import html
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from clients.device import Closed, DeviceClient
from support.browser import CHROMEDRIVER, CHROMIUM, FLAGS, webdriver
from support.gateways import API_TOKEN, OPS_TOKENS, SECRET, metric_value, start_guarded
from support.waiting import wait_until

OPS_TOKEN = OPS_TOKENS[0]
OPS = requests.auth.HTTPBasicAuth("operator", OPS_TOKEN)

needs_chromium = pytest.mark.skipif(CHROMIUM is None,
                                    reason="needs Chromium: run .ci/ensure-chromium (root + apt-get) first")


def page_url(gateway: Any, fragment: str = "") -> str:
    """The page with the ops token as the basic-auth password in its address, as a browser may be given it."""
    return f"http://operator:{OPS_TOKEN}@127.0.0.1:{gateway.port}/{fragment}"


def chromium(tmp_path: Path, url: str, *args: str) -> str:
    """Run headless Chromium on `url` with a fresh profile; 5 s of virtual time lets the page poll."""
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                             *args, url], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def shown(dom: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}"[^>]*data-value="([^"]*)"', dom)
    assert match, f"#{element_id} not in the page"
    return html.unescape(match.group(1))


def table_rows(dom: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}".*?<tbody>(.*?)</tbody>', dom, re.DOTALL).group(1)
    rows = re.findall(r"<tr>(.*?)</tr>", body, re.DOTALL)
    return [[html.unescape(re.sub("<[^>]+>", "", cell)) for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.DOTALL)]
            for row in rows]


def status_json(gateway: Any) -> dict[str, Any]:
    return requests.get(f"{gateway.http}/status.json", auth=OPS, timeout=5).json()


@needs_chromium
def test_status_page_shows_the_gateways_state(tmp_path):
    gateway = start_guarded(tmp_path, workers=2)
    devices = []
    try:
        assert requests.get(f"{gateway.http}/", timeout=5).status_code == 401
        page = requests.get(f"{gateway.http}/", auth=OPS, timeout=5)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN
        for number, url in enumerate((gateway.ws, gateway.ws, gateway.tcp)):
            device = DeviceClient(url)
            assert device.hello(f"status-{number}", SECRET)["type"] == "welcome"
            devices.append(device)
        with DeviceClient(gateway.tcp) as refused:
            assert refused.hello("status-bad", "wrong-secret")["code"] == "unauthorized"
        wait_until(lambda: status_json(gateway)["sessions"] == 3)

        dom = chromium(tmp_path, page_url(gateway), "--dump-dom")
        metrics = requests.get(f"{gateway.http}/metrics", headers={"Authorization": f"Bearer {OPS_TOKEN}"},
                               timeout=5).text

        assert shown(dom, "sessions-now") == "3" == str(int(metric_value(metrics, "warren_sessions")))
        assert shown(dom, "workers-now") == "2"
        workers = table_rows(dom, "workers")
        assert sorted(int(pid) for pid, _ in workers) == sorted(gateway.worker_pids())
        assert sum(int(sessions) for _, sessions in workers) == 3
        assert shown(dom, "accepted-total") == "3"
        assert shown(dom, "broker-publisher") == "2" and shown(dom, "broker-consumer") == "2"
        assert "ws: 2, tcp: 1" in dom or "tcp: 1, ws: 2" in dom
        assert ["unauthorized", "1"] in table_rows(dom, "errors")
        assert shown(dom, "accept-rate") != ""  # polled at least twice: a rate
        assert '<polyline points="' in dom  # the chart is drawn

        # A lookup from the page's address: the ops credentials the browser holds are enough.
        dom = chromium(tmp_path, page_url(gateway, "#device=status-2"), "--dump-dom")
        assert shown(dom, "device-state") == "online"
        assert shown(dom, "device-transport") == "tcp" and shown(dom, "device-host") == socket.gethostname()
        assert int(shown(dom, "device-worker")) in gateway.worker_pids()

        for device in devices[:2]:
            device.close()
        wait_until(lambda: status_json(gateway)["sessions"] == 1)
        dom = chromium(tmp_path, page_url(gateway, "#device=status-0"), "--dump-dom")
        assert shown(dom, "sessions-now") == "1"
        assert shown(dom, "device-state") == "offline"
    finally:
        for device in devices:
            device.close()
        gateway.stop()


def hello_answer(gateway: Any, device: str = "stolen-lock") -> dict:
    with DeviceClient(gateway.ws) as client:
        return client.hello(device, SECRET)


@needs_chromium
@pytest.mark.skipif(CHROMEDRIVER is None, reason="needs chromedriver: run .ci/ensure-chromium first")
def test_an_operator_looks_a_device_up_and_kicks_it_from_the_page(tmp_path):
    gateway = start_guarded(tmp_path, workers=2)
    device = DeviceClient(gateway.ws)
    try:
        welcome = device.hello("stolen-lock", SECRET)
        with webdriver(tmp_path) as browser:
            browser.open(page_url(gateway))
            browser.type("#device-id", "stolen-lock")
            browser.click("#lookup-button")
            browser.wait_for("device-state", "online")
            assert browser.value("device-session") == welcome["session"]
            assert browser.value("device-transport") == "ws"
            assert int(browser.value("device-worker")) in gateway.worker_pids()
            assert abs(int(browser.value("device-since")) / 1000 - time.time()) < 60

            browser.click("#kick-button")  # no API token yet: the page asks for it, nothing is sent
            browser.wait_for("kick-state", "token")
            assert not browser.hidden("token-row")
            device.send({"type": "ping"})
            assert device.receive(timeout=5) == {"type": "pong"}  # still connected
            browser.type("#api-token", "not-the-token")
            browser.click("#kick-button")
            browser.wait_for("kick-state", "unauthorized")
            assert browser.fetch_status("status.json") == 200  # a refused API token leaves the ops login be
            browser.clear("#api-token")
            browser.type("#api-token", API_TOKEN)
            browser.click("#kick-button")
            browser.wait_for("kick-state", "kicked")

            frame = device.receive(timeout=5)
            assert frame["type"] == "error" and frame["code"] == "kicked"
            with pytest.raises(Closed):
                device.receive(timeout=5)

            # The kick is useless without a ban: ban it from the page, see it listed, lift it.
            browser.type("#ban-reason", "reported stolen")
            browser.click("#ban-button")
            browser.wait_for("ban-state", "banned")
            wait_until(lambda: hello_answer(gateway).get("code") == "banned")
            browser.click("#bans-button")
            browser.wait_for("bans-state", "1")
            browser.click("#lift-button")
            browser.wait_for("ban-state", "lifted")
            wait_until(lambda: hello_answer(gateway)["type"] == "welcome")
    finally:
        device.close()
        gateway.stop()
