"""Two gateway instances on one RabbitMQ, as two hosts of one deployment (PROTOCOL.md 2.4 and 6).

Instance A is the conftest `gateway`; instance B is a second gunicorn on another
port pair. Nothing joins them but RabbitMQ: a command through either instance's
HTTP API reaches the device wherever its session is, and a hello on B takes a
device over from A.
"""

from __future__ import annotations

from typing import Any

import pytest

from app.auth import mint
from clients.backend import BackendClient
from clients.device import DeviceClient
from support.devices import (
    TRANSPORTS,
    answer_next_command,
    connect,
    expect,
    expect_closed,
    expect_error,
    in_background,
    ping_ok,
    survivors,
    uid,
)
from support.gateways import AMQP_URL, SECRET, Gateway, start_gateway
from support.rabbitmq import EventTap
from support.waiting import WAIT


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def host_b(tmp_path_factory: pytest.TempPathFactory) -> Any:
    instance = start_gateway(tmp_path_factory.mktemp("host-b"), workers=2, HELLO_TIMEOUT="2")
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def backend() -> Any:
    with BackendClient(AMQP_URL) as client:
        yield client


def command_via(api: Gateway, device: str, client: DeviceClient) -> dict[str, Any]:
    """A command through `api`'s HTTP API, answered by `client`; the HTTP answer's JSON."""
    response = in_background(api.command, device, "unlock", {"via": api.port}, timeout=WAIT)
    command = answer_next_command(client)
    assert command["data"] == {"via": api.port}
    result = response.result(WAIT + 10)
    assert result.status_code == 200, result.text
    return result.json()


def test_a_device_on_a_is_commanded_through_b(gateway: Gateway, host_b: Gateway, transport: str) -> None:
    device = uid("lock")
    client, _ = connect(gateway, transport, device)
    with client:
        for api in (host_b, gateway, host_b):
            assert command_via(api, device, client) == {
                "ok": True, "data": {"done": "unlock", "got": {"via": api.port}}, "error": None}


def test_offline_on_both_hosts(gateway: Gateway, host_b: Gateway) -> None:
    for api in (gateway, host_b):
        assert api.command(uid("offline"), timeout=WAIT).status_code == 404


def test_takeover_moves_a_device_from_a_to_b(gateway: Gateway, host_b: Gateway, backend: BackendClient,
                                             transport: str) -> None:
    device = uid()
    other = "ws" if transport == "tcp" else "tcp"
    with EventTap(f"{device}.session.*") as tap:
        on_a, first = connect(gateway, transport, device)
        with on_a:
            assert tap.get(f"{device}.session.connected")["session"] == first["session"]
            on_b, second = connect(host_b, other, device)
            with on_b:
                expect_error(on_a, "replaced")
                expect_closed(on_a)
                closed = tap.get(f"{device}.session.closed")
                assert closed["session"] == first["session"] and closed["data"] == {"reason": "replaced"}
                ping_ok(on_b)
                for api in (gateway, host_b, gateway):
                    assert command_via(api, device, on_b)["ok"] is True
                command_id = backend.send(device, "lock", timeout=WAIT)
                expect(on_b, "command", id=command_id)
                on_b.send({"type": "reply", "id": command_id, "ok": True})
                assert backend.wait(command_id, WAIT)["ok"] is True
                assert second["session"] != first["session"]


def test_takeover_back_from_b_to_a(gateway: Gateway, host_b: Gateway) -> None:
    device = uid()
    on_b, _ = connect(host_b, "tcp", device)
    with on_b:
        on_a, _ = connect(gateway, "ws", device)
        with on_a:
            expect_error(on_b, "replaced")
            expect_closed(on_b)
            for api in (host_b, gateway):
                assert command_via(api, device, on_a)["ok"] is True


def test_simultaneous_hellos_on_two_hosts_leave_exactly_one(gateway: Gateway, host_b: Gateway) -> None:
    device = uid()
    hello = {"type": "hello", "device": device, "token": mint(SECRET.encode(), device)}
    hosts = [gateway, host_b]
    clients = [DeviceClient(hosts[n % 2].url(TRANSPORTS[(n // 2) % 2])) for n in range(8)]
    try:
        for client in clients:
            client.send(hello)
        welcomed = []
        for client in clients:
            frame = client.receive(timeout=WAIT)
            if frame.get("type") == "error":
                assert frame["code"] == "replaced", frame
                expect_closed(client)
            else:
                assert frame["type"] == "welcome", frame
                welcomed.append(client)
        alive = survivors(welcomed, settle=2.0)
        assert len(alive) == 1, f"{len(alive)} sessions survived"
        for api in hosts:
            assert command_via(api, device, alive[0])["ok"] is True
    finally:
        for client in clients:
            client.close()


def test_no_host_logged_a_crash(gateway: Gateway, host_b: Gateway) -> None:
    for instance in (gateway, host_b):
        log = instance.log()
        for marker in ("Traceback", "CRITICAL", "Worker exiting", "WORKER TIMEOUT"):
            assert marker not in log, f"{marker!r} in {instance.log_path}:\n{log[-5000:]}"
