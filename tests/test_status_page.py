"""The operators' status page (GET /), rendered by a real headless Chromium, shows the gateway's state."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import SECRET, metric_value, start_gateway, wait_until

from clients.device import DeviceClient

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


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


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: run .ci/ensure-chromium (root + apt-get) first")
def test_status_page_shows_the_gateways_state(tmp_path):
    gateway = start_gateway(tmp_path, workers=2)
    devices = []
    try:
        page = requests.get(f"{gateway.http}/", timeout=5)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
        assert "http://" not in page.text and "https://" not in page.text  # self-contained: no CDN
        for number, url in enumerate((gateway.ws, gateway.ws, gateway.tcp)):
            device = DeviceClient(url)
            assert device.hello(f"status-{number}", SECRET)["type"] == "welcome"
            devices.append(device)
        with DeviceClient(gateway.tcp) as refused:
            assert refused.hello("status-bad", "wrong-secret")["code"] == "unauthorized"
        wait_until(lambda: requests.get(f"{gateway.http}/status.json", timeout=5).json()["sessions"] == 3)

        dom = chromium(tmp_path, f"{gateway.http}/", "--dump-dom")
        metrics = requests.get(f"{gateway.http}/metrics", timeout=5).text

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

        for device in devices[:2]:
            device.close()
        wait_until(lambda: requests.get(f"{gateway.http}/status.json", timeout=5).json()["sessions"] == 1)
        dom = chromium(tmp_path, f"{gateway.http}/", "--dump-dom")
        assert shown(dom, "sessions-now") == "1"
    finally:
        for device in devices:
            device.close()
        gateway.stop()
