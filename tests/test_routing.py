"""The partitioned routing (issue 19) against real gunicorn and RabbitMQ: section 2.4's promises in a mass
reconnect, an owner killed or paused, a rolling restart; nothing in RabbitMQ's metadata per device; and
start-up naming what RabbitMQ lacks. The racing hellos and a node stopped under load on a cluster are in
test_cluster.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import gevent
import orjson
import requests

from support.gateways import API_TOKEN, Gateway, start_gateway, wait_ready
from support.rabbitmq import rabbitmqctl
from support.swarm import CommandingBackend, Swarm
from support.waiting import wait_until


def check_section_2_4(swarm: Swarm, backend: CommandingBackend, may_expire: float = 0.0) -> None:
    """Every command answered exactly once, delivered at most once, and never to a session older than one
    welcomed before the command was published. `may_expire`: the share that may go unanswered where a
    worker stops with commands in flight (section 2.4: "exactly one unless it expires unanswered"; the
    gateway picks none over two when it cannot tell whether a dead owner passed a command on)."""
    # A command written to a session that a takeover then ended may lose the device's reply with the
    # old connection: it expires unanswered (section 2.4 allows that). One never delivered may not.
    unanswered = [(cid, swarm.deliveries.get(cid)) for cid in backend.published
                  if not backend.answers.get(cid) and not swarm.deliveries.get(cid)]
    twice = {cid: answers for cid, answers in backend.answers.items() if len(answers) > 1}
    delivered_twice = {cid: d for cid, d in swarm.deliveries.items() if len(d) > 1}
    if unanswered:
        print(f"\n[figure] {len(unanswered)} of {len(backend.published)} commands unanswered (expired)")
    assert len(unanswered) <= may_expire * len(backend.published), \
        f"{len(unanswered)} of {len(backend.published)} commands unanswered: {unanswered[:5]}"
    assert not twice, f"{len(twice)} commands answered twice: {list(twice.items())[:3]}"
    assert not delivered_twice, f"{len(delivered_twice)} commands delivered twice: {list(delivered_twice.items())[:3]}"
    late = []
    for cid, [(device, session, _at)] in swarm.deliveries.items():
        published = backend.published[cid][1]
        sessions = [s for s, _ in swarm.welcomes[device]]
        newer = swarm.welcomes[device][sessions.index(session) + 1:]
        if any(welcomed < published for _, welcomed in newer):
            late.append((cid, session, newer))
    assert not late, f"{len(late)} commands reached an older session after a newer one's welcome: {late[:3]}"


@contextlib.contextmanager
def fleet(tmp_path: Path, prefix: str, count: int, presence: bool = True,
          **env: str) -> Iterator[tuple[Gateway, list[str], Swarm, CommandingBackend]]:
    """A 2-worker gateway, `count` device ids, the swarm that will hold them and a backend commanding them
    (one command to each new session of theirs when `presence`); all stopped at the end."""
    gateway = start_gateway(tmp_path, workers=2, **env)
    devices = [f"{prefix}-{os.getpid()}-{i}" for i in range(count)]
    swarm = Swarm(gateway.device_port)
    backend = CommandingBackend(set(devices) if presence else set())
    try:
        yield gateway, devices, swarm, backend
    finally:
        backend.close()
        swarm.close()
        gateway.stop()


def test_a_mass_reconnect_with_commands_flowing_answers_every_command_once(tmp_path: Path) -> None:
    """2,000 devices take over their own sessions at once, twice, while commands flow and each new session
    gets a command as soon as its `session.connected` is out (the held-out check of issue 19)."""
    with fleet(tmp_path, "mass", 2000) as (_gateway, devices, swarm, backend):
        swarm.connect_all(devices)
        backend.flow(devices, rate=300)
        for _round in range(2):
            gevent.sleep(1)
            swarm.connect_all(devices, concurrency=500)  # the old connections are still up: takeovers
        gevent.sleep(2)
        backend.stop_flow()
        backend.settle(timeout=30)
        assert len(backend.published) > 4000 + 300
        check_section_2_4(swarm, backend)
        assert swarm.errors["replaced"] >= len(devices), swarm.errors

def count_metadata() -> tuple[int, int, int]:
    """RabbitMQ's queues, bindings and exchanges in the default vhost."""
    counts = []
    for what in ("list_queues", "list_bindings", "list_exchanges"):
        out = rabbitmqctl(what, "--formatter", "json", "name" if what != "list_bindings" else "source_name")
        counts.append(len(orjson.loads(out[out.index("["):])))
    return counts[0], counts[1], counts[2]


def test_metadata_does_not_grow_with_devices(tmp_path: Path) -> None:
    """Rule (1) of PROTOCOL.md section 5: with 5,000 devices held, RabbitMQ holds as many queues, bindings
    and exchanges as with none; their sessions' starts wrote nothing there."""
    gateway = start_gateway(tmp_path, workers=2)
    swarm = Swarm(gateway.device_port)
    try:
        before = count_metadata()
        swarm.connect_all([f"meta-{os.getpid()}-{i}" for i in range(5000)])
        held = count_metadata()
        swarm.close()
        wait_until(lambda: count_metadata() == before, timeout=30)
        assert held == before, f"queues, bindings, exchanges: {before} with none held, {held} with 5,000"
    finally:
        swarm.close()
        gateway.stop()


def test_an_owner_killed_while_commands_flow_loses_none_of_the_other_workers_commands(tmp_path: Path) -> None:
    """SIGKILL one of two workers: the partitions it owned move to the other (their claims redelivered in
    order), whose devices miss no command; the dead worker's devices come back and answer again."""
    with fleet(tmp_path, "own", 400, presence=False) as (gateway, devices, swarm, backend):
        swarm.connect_all(devices)
        victim = gateway.worker_pids()[0]
        held_by_victim = {d for d in devices if info(gateway, d)["worker"] == victim}
        survivors = [d for d in devices if d not in held_by_victim]
        assert held_by_victim and survivors
        backend.flow(survivors, rate=200)
        gevent.sleep(1)
        os.kill(victim, signal.SIGKILL)
        gevent.sleep(3)
        backend.stop_flow()
        backend.settle(timeout=30)
        answers = [a for cid in backend.published for a in backend.answers.get(cid, [])]
        assert all(a.get("ok") for a in answers), [a for a in answers if not a.get("ok")][:5]
        check_section_2_4(swarm, backend, may_expire=0.01)
        wait_ready(gateway, 2)
        swarm.connect_all(sorted(held_by_victim))  # their connections died with the worker: they come back
        for device in sorted(held_by_victim)[:20]:
            backend.command(device)
        backend.settle(timeout=30)
        check_section_2_4(swarm, backend, may_expire=0.01)


def test_a_paused_worker_whose_devices_moved_ends_its_old_sessions_when_it_resumes(tmp_path: Path) -> None:
    """SIGSTOP one worker; its devices connect again and land on the other one (RabbitMQ drops the paused
    worker's connection at its heartbeat timeout and its partitions fail over); SIGCONT: the resumed
    worker's old sessions end `replaced` and no command reaches them."""
    with fleet(tmp_path, "stop", 200, AMQP_HEARTBEAT="2") as (gateway, devices, swarm, backend):
        swarm.connect_all(devices)
        paused = gateway.worker_pids()[0]
        moved = [d for d in devices if info(gateway, d)["worker"] == paused]
        assert moved
        os.kill(paused, signal.SIGSTOP)
        try:
            swarm.connect_all(moved)  # welcomed by the other worker, once the paused one's partitions moved
        finally:
            os.kill(paused, signal.SIGCONT)
        backend.flow(devices, rate=100)
        gevent.sleep(5)
        backend.stop_flow()
        backend.settle(timeout=30)
        check_section_2_4(swarm, backend)
        assert all(info(gateway, d)["worker"] != paused for d in moved)


def test_a_rolling_restart_of_every_worker_answers_no_command_twice(tmp_path: Path) -> None:
    """Each worker in turn told to stop (SIGTERM, as a deploy would) and replaced by gunicorn, while
    devices are held and commands flow; the devices it sends away come back."""
    with fleet(tmp_path, "roll", 300, GRACEFUL_TIMEOUT="6") as (gateway, devices, swarm, backend):
        swarm.connect_all(devices)
        backend.flow(devices, rate=100)
        for pid in gateway.worker_pids():
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda pid=pid: pid not in gateway.worker_pids() and len(gateway.worker_pids()) == 2,
                       timeout=60)
            wait_ready(gateway, 2)
            swarm.connect_all([d for d in devices if not online(gateway, d)])
        backend.stop_flow()
        backend.settle(timeout=30)
        check_section_2_4(swarm, backend, may_expire=0.01)
        assert swarm.errors["shutting_down"] > 0


def test_start_up_names_the_missing_alternate_exchange_policy(tmp_path: Path) -> None:
    """A vhost without the warren-routes policy: the worker says which policy to set, and keeps trying."""
    vhost = f"warren-no-policy-{os.getpid()}"
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        gateway = start_gateway(tmp_path, workers=1, wait=False,
                                AMQP_URL=f"amqp://guest:guest@127.0.0.1:5672/{vhost}")
        try:
            wait_until(lambda: "set_policy warren-routes" in gateway.log(), timeout=30)
            assert "alternate" in gateway.log()
        finally:
            gateway.stop()
    finally:
        rabbitmqctl("delete_vhost", vhost)


def info(gateway: Gateway, device: str) -> dict:
    """GET /devices/<device>: where its session lives, asked through the routing like a command."""
    response = requests.get(f"{gateway.http}/devices/{device}", headers={"Authorization": f"Bearer {API_TOKEN}"},
                            timeout=15)
    assert response.status_code in (200, 404), response.text
    return response.json()


def online(gateway: Gateway, device: str) -> bool:
    return bool(info(gateway, device).get("online"))
