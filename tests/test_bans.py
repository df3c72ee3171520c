"""Bans and flapping (PROTOCOL.md section 6), against real gunicorn instances and the real RabbitMQ.

Two instances share one deployment's ban stream (`BANS_STREAM`), as two hosts would:
- a ban issued on one ends the device's session on the other, with `banned` and its
  `retry_after`; hellos are refused on both (JSON and MQTT), after the token check;
- a timed ban ends by itself; a lift lets the device back in; GET /bans lists them;
- bans outlive a restart of both instances;
- a device alternating between the two instances faster than FLAP_MAX allows is banned
  `by: flapping`, while one reconnecting a few times is not.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from clients.backend import BackendClient
from clients.device import Closed, DeviceClient
from support.gateways import API_TOKEN, SECRET, Gateway, delete_stream, start_gateway
from support.mqtt_devices import MqttDevice
from support.rabbitmq import private_vhost
from support.waiting import wait_until

API = {"Authorization": f"Bearer {API_TOKEN}"}
FLAP = {"FLAP_MAX": "4", "FLAP_WINDOW": "60", "FLAP_BAN": "30"}
# A vhost of its own: flapping is counted by whichever worker owns the device's routing partition, and
# on the shared vhost that may be another test's gateway, counting with its own FLAP_MAX.
VHOST = "warren-bans-test"


def a_device() -> str:
    return f"ban-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def deployment() -> Iterator[dict[str, str]]:
    """What the instances of one deployment share: its vhost and its ban stream."""
    shared = {"AMQP_URL": private_vhost(VHOST), "BANS_STREAM": f"warren.bans.test.{uuid.uuid4().hex[:12]}", **FLAP}
    yield shared
    delete_stream(shared["AMQP_URL"], shared["BANS_STREAM"])


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, deployment: dict[str, str]) -> Iterator[list[Gateway]]:
    """Two instances of one deployment (one worker each: the machine has two cores)."""
    instances = [start_gateway(tmp_path_factory.mktemp(f"bans-{n}"), workers=1, **deployment) for n in range(2)]
    yield instances
    for instance in instances:
        instance.stop()


def ban(gateway: Gateway, device: str, **body: object) -> requests.Response:
    return requests.put(f"{gateway.http}/devices/{device}/ban", json=body or None, headers=API, timeout=20)


def hello(gateway: Gateway, device: str, secret: str = SECRET) -> dict:
    with DeviceClient(gateway.tcp) as client:
        return client.hello(device, secret)


def test_a_ban_on_one_instance_ends_the_session_on_the_other_and_refuses_hellos_on_both(pair: list[Gateway]) -> None:
    first, second = pair
    device, bystander = a_device(), a_device()
    with DeviceClient(second.tcp) as client, DeviceClient(second.tcp) as other:
        assert client.hello(device, SECRET)["type"] == "welcome"
        assert other.hello(bystander, SECRET)["type"] == "welcome"
        answer = ban(first, device, **{"for": 120, "reason": "stolen"})
        assert answer.status_code == 200, answer.text
        stored = answer.json()
        assert (stored["device"], stored["reason"], stored["by"]) == (device, "stolen", "operator")
        assert abs(stored["until"] / 1000 - (time.time() + 120)) < 30
        error = client.receive(timeout=10)
        assert error["type"] == "error" and error["code"] == "banned"
        assert 60 < error["retry_after"] <= 120
        with pytest.raises(Closed):
            client.receive(timeout=5)
        other.send({"type": "ping"})
        assert other.receive(timeout=5) == {"type": "pong"}  # nobody else's session ends
    for gateway in pair:
        refused = hello(gateway, device)
        assert refused["code"] == "banned" and refused["retry_after"] > 0
        # The token comes first: without it nobody learns that the device is banned.
        assert hello(gateway, device, secret="not-the-secret")["code"] == "unauthorized"
        listed = requests.get(f"{gateway.http}/bans", headers=API, timeout=10).json()["bans"]
        assert {"device": device, "until": stored["until"], "reason": "stolen", "by": "operator"} in listed


def test_an_mqtt_connect_of_a_banned_device_gets_connack_5(pair: list[Gateway]) -> None:
    device = a_device()
    assert ban(pair[0], device).status_code == 200
    wait_until(lambda: hello(pair[1], device).get("code") == "banned", timeout=5)
    with MqttDevice(pair[1], device) as client:
        assert client.connack() == (False, "Not authorized")  # CONNACK 0x05, as for a bad token


def test_a_timed_ban_ends_by_itself_and_a_lift_lets_the_device_back_at_once(pair: list[Gateway]) -> None:
    first, second = pair
    timed, lifted = a_device(), a_device()
    assert ban(first, timed, **{"for": 2}).status_code == 200
    assert ban(first, lifted).json()["until"] is None
    wait_until(lambda: hello(second, timed).get("code") == "banned" and hello(second, lifted).get("code") == "banned",
               timeout=5)
    wait_until(lambda: hello(second, timed)["type"] == "welcome", timeout=10)
    assert hello(first, lifted)["code"] == "banned"
    answer = requests.delete(f"{second.http}/devices/{lifted}/ban", headers=API, timeout=20)
    assert answer.status_code == 200 and answer.json() == {"device": lifted, "lifted": True}
    wait_until(lambda: hello(first, lifted)["type"] == "welcome", timeout=5)
    again = requests.delete(f"{first.http}/devices/{lifted}/ban", headers=API, timeout=20)
    assert again.status_code == 404 and again.json()["error"] == "not_banned"


def test_the_backend_client_bans_lists_and_lifts_through_the_stream(pair: list[Gateway],
                                                                     deployment: dict[str, str]) -> None:
    device, by_api = a_device(), a_device()
    assert ban(pair[0], by_api, reason="by the API").status_code == 200
    with BackendClient(deployment["AMQP_URL"]) as backend, DeviceClient(pair[1].tcp) as client:
        assert client.hello(device, SECRET)["type"] == "welcome"
        stored = backend.ban(device, seconds=300, reason="from a backend", stream=deployment["BANS_STREAM"])
        assert (stored["device"], stored["by"], stored["reason"]) == (device, "operator", "from a backend")
        assert client.receive(timeout=10)["code"] == "banned"
        listed = backend.bans(stream=deployment["BANS_STREAM"])
        assert {b["device"] for b in listed} >= {device, by_api}
        assert hello(pair[0], device)["code"] == "banned"
        assert backend.lift(device, stream=deployment["BANS_STREAM"]) is True
        assert backend.lift(device, stream=deployment["BANS_STREAM"]) is False
    wait_until(lambda: hello(pair[0], device)["type"] == "welcome", timeout=5)


def test_a_device_that_flaps_between_two_instances_is_banned_and_one_that_reconnects_a_few_times_is_not(
        pair: list[Gateway]) -> None:
    flapping, calm = a_device(), a_device()
    answers = []
    for attempt in range(int(FLAP["FLAP_MAX"]) + 4):  # FLAP_MAX starts, then refused (a start or two of lag)
        answers.append(hello(pair[attempt % 2], flapping))
        if answers[-1]["type"] == "error":
            break
        time.sleep(0.3)  # its `session.closed` and release travel; the next hello is a new start
    welcomed = [a for a in answers if a["type"] == "welcome"]
    assert answers[-1]["code"] == "banned", answers
    assert int(FLAP["FLAP_MAX"]) <= len(welcomed) <= int(FLAP["FLAP_MAX"]) + 2
    listed = requests.get(f"{pair[0].http}/bans", headers=API, timeout=10).json()["bans"]
    [entry] = [b for b in listed if b["device"] == flapping]
    assert entry["by"] == "flapping" and entry["until"] is not None
    for attempt in range(int(FLAP["FLAP_MAX"]) - 1):
        assert hello(pair[attempt % 2], calm)["type"] == "welcome"
        time.sleep(0.3)
    assert calm not in {b["device"] for b in requests.get(f"{pair[1].http}/bans", headers=API, timeout=10).json()["bans"]}


def test_bans_outlive_a_restart_of_every_instance(tmp_path: Path, deployment: dict[str, str],
                                                 pair: list[Gateway]) -> None:
    device = a_device()
    assert ban(pair[0], device, reason="kept").status_code == 200
    for instance in pair:
        instance.stop()
    restarted = [start_gateway(tmp_path, workers=1, **deployment) for _ in range(2)]
    try:
        for instance in restarted:
            assert hello(instance, device)["code"] == "banned"
            listed = requests.get(f"{instance.http}/bans", headers=API, timeout=10).json()["bans"]
            assert any(b["device"] == device and b["reason"] == "kept" for b in listed)
    finally:
        for instance in restarted:
            instance.stop()
