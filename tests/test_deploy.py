"""Heroku-style deploy: the Procfile's `web` command as written, configured by the platform's variables."""

from __future__ import annotations

import json
import os
import re
import runpy
import signal
import subprocess
import time

import requests

from app.config import load
from clients.device import DeviceClient
from support.devices import answer_next_command, in_background
from support.gateways import AMQP_URL, API_TOKEN, ROOT, SECRET, Gateway, free_port, start_gateway, wait_ready


def procfile_command(process_type: str = "web") -> str:
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() == process_type:
            return command.strip()
    raise AssertionError(f"no {process_type!r} line in the Procfile")


def test_procfile_web_command_serves_devices_over_ws_with_cloudamqp_url(tmp_path):
    command = procfile_command()
    assert command == "gunicorn -c gunicorn.conf.py wsgi:app"
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in {"AMQP_URL", "CLOUDAMQP_URL", "RABBITMQ_URL", "PROMETHEUS_MULTIPROC_DIR", "BIND_HOST"}}
    env.update({
        # What the platform and the add-on set; the buildpack puts the app's venv on PATH.
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "PORT": str(port), "WEB_CONCURRENCY": "2", "CLOUDAMQP_URL": AMQP_URL, "DEVICE_PORT": "",
        "DEVICE_SECRETS": SECRET, "API_TOKENS": API_TOKEN, "DYNO": "web.1",
    })
    log_path = tmp_path / "web.log"
    process = subprocess.Popen(["sh", "-c", command], cwd=ROOT, env=env, stdout=log_path.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    gateway = Gateway(process, port, 0, env, log_path)
    try:
        wait_ready(gateway, workers=2)
        with DeviceClient(f"ws://127.0.0.1:{port}/ws") as device:
            welcome = device.hello("lock-heroku", SECRET)
            assert welcome["type"] == "welcome", welcome
            device.send({"type": "ping"})
            assert device.receive() == {"type": "pong"}
        log = gateway.log()
        # Bound on every interface, the HTTP port only (DEVICE_PORT is empty on Heroku).
        assert re.search(rf"Listening at: http://0\.0\.0\.0:{port} ", log), log
        assert "in-process broker" not in log
        assert requests.get(f"{gateway.http}/healthz", timeout=5).status_code == 200
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # as the platform stops a dyno: every process of it
        deadline = time.monotonic() + 40
        while group_alive(process.pid) and time.monotonic() < deadline:
            process.poll()  # reap sh, or its zombie keeps the group alive
            time.sleep(0.1)
        if group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert "Shutting down: Master" in gateway.log()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_gunicorn_settings_suit_the_platform(monkeypatch):
    """Workers from WEB_CONCURRENCY, 0.0.0.0:$PORT, drained before the router's 30 s SIGKILL, no recycling."""
    monkeypatch.setenv("PORT", "5123")
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    monkeypatch.setenv("CLOUDAMQP_URL", AMQP_URL)
    for name in ("AMQP_URL", "DEVICE_PORT", "BIND_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MQTT_PORT", "")  # 1883 may or may not be taken here (Mosquitto): off, to be exact
    monkeypatch.setenv("WARREN_SKIPPED_PORTS", "")  # as if probed: the file must not mark this process
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(ROOT / ".pytest_cache" / f"conf-{time.time_ns()}"))
    settings = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    assert settings["bind"] == ["0.0.0.0:5123", "0.0.0.0:7878"]
    assert settings["workers"] == 3
    assert settings["graceful_timeout"] < 30
    assert settings["max_requests"] == 0
    assert settings["worker_class"] == "app.worker.WarrenWorker"
    settings["on_exit"](None)  # removes the metrics directory it made


def test_config_reads_the_platforms_variables():
    config = load({"CLOUDAMQP_URL": "amqps://u:p@lemur.rmq.cloudamqp.com/vhost", "PORT": "3000",
                   "DEVICE_PORT": "", "HEROKU_SLUG_COMMIT": "0123abc", "SENTRY_ENVIRONMENT": "staging"})
    assert config.amqp_url == "amqps://u:p@lemur.rmq.cloudamqp.com/vhost"
    assert (config.bind_host, config.port, config.device_port) == ("0.0.0.0", 3000, None)
    assert (config.release, config.environment) == ("0123abc", "staging")
    assert load({"AMQP_URL": "amqp://a//", "CLOUDAMQP_URL": "amqp://b//"}).amqp_url == "amqp://a//"
    assert load({"SOURCE_VERSION": "feed", "HEROKU_SLUG_COMMIT": "beef"}).release == "feed"


def test_app_json_and_python_version():
    manifest = json.loads((ROOT / "app.json").read_text())
    assert manifest["name"] and manifest["description"]
    assert {"plan": "cloudamqp:lemur"} in manifest["addons"]
    assert manifest["env"]["DEVICE_SECRETS"]["generator"] == "secret"
    assert manifest["env"]["API_TOKENS"]["generator"] == "secret"
    assert {"WEB_CONCURRENCY", "HEARTBEAT"} <= set(manifest["env"])
    assert manifest["formation"]["web"]["quantity"] == 1
    assert {"url": "heroku/python"} in manifest["buildpacks"]
    assert (ROOT / ".python-version").read_text().strip() == "3.11"


def test_make_run_without_rabbitmq_serves_a_device_on_the_in_process_broker(tmp_path):
    """`make run` with no AMQP_URL (the README's first command): one worker on kombu's in-process broker,
    said loudly, and a device still gets the whole round trip: welcome, an API command and its reply,
    `offline` for a device with no session, and an event nacked `unroutable` (no queue takes it there)."""
    gateway = start_gateway(tmp_path, workers=1, AMQP_URL="")
    try:
        assert "running ONE worker on kombu's in-process broker" in gateway.log()
        headers = {"Authorization": f"Bearer {API_TOKEN}"}
        with DeviceClient(f"tcp://127.0.0.1:{gateway.device_port}") as device:
            assert device.hello("lock-local", SECRET)["type"] == "welcome"
            answer = in_background(requests.post, f"{gateway.http}/devices/lock-local/commands", headers=headers,
                                   json={"name": "unlock", "data": {"for": 5}}, timeout=10)
            command = answer_next_command(device)
            assert command["name"] == "unlock" and command["data"] == {"for": 5}
            reply = answer.result(timeout=10)
            assert reply.status_code == 200 and reply.json()["ok"] is True, reply.text
            device.send({"type": "event", "id": "e-1", "name": "door.opened"})
            nack = device.receive(timeout=10)
            assert (nack["type"], nack["id"], nack["reason"]) == ("nack", "e-1", "unroutable"), nack
        offline = requests.post(f"{gateway.http}/devices/lock-elsewhere/commands", headers=headers,
                                json={"name": "unlock"}, timeout=10)
        assert offline.status_code == 404 and offline.json()["error"] == "offline", offline.text
    finally:
        gateway.stop()
