"""When a worker stands by for the partitions it does not prefer (app/standby.py), and its owner's use of it."""

from __future__ import annotations

import os
from typing import Any

import pytest

from app.broker import partitions as partitions_module
from app.broker.partitions import PartitionOwner
from app.standby import SETTLE, STANDBY_MAX, StandbyBoard


def test_a_worker_stands_by_once_every_slot_took_its_own_and_settled() -> None:
    board = StandbyBoard()
    board.took_own(0, now=100.0)
    assert not board.may_stand_by(3, connected_at=100.0, now=105.0)  # slots 1 and 2 have not subscribed yet
    board.took_own(1, now=103.0)
    board.took_own(2, now=106.0)  # connected 6 s after the first: a busy host
    assert not board.may_stand_by(3, connected_at=100.0, now=106.0 + SETTLE / 2)  # RabbitMQ may not have it yet
    assert board.may_stand_by(3, connected_at=100.0, now=106.0 + SETTLE)
    assert board.may_stand_by(3, connected_at=106.0, now=106.0 + SETTLE)  # the last one too, at once


def test_stamps_older_than_a_workers_connect_by_standby_max_do_not_count() -> None:
    """A worker reconnecting alone, hours after the others took theirs: it waits STANDBY_MAX (the others
    stand by already), rather than reading the old stamps as the others having just taken their own."""
    board = StandbyBoard()
    board.took_own(0, now=10.0)
    board.took_own(1, now=5000.0)
    assert not board.may_stand_by(2, connected_at=5000.0, now=5000.0 + SETTLE)
    assert board.may_stand_by(2, connected_at=5000.0, now=5000.0 + STANDBY_MAX)


def test_a_worker_that_never_comes_up_delays_standby_by_standby_max_at_most() -> None:
    board = StandbyBoard()
    board.took_own(0, now=50.0)
    assert not board.may_stand_by(2, connected_at=50.0, now=50.0 + STANDBY_MAX - 0.1)
    assert board.may_stand_by(2, connected_at=50.0, now=50.0 + STANDBY_MAX)


def test_slots_beyond_the_board_share_stamps_and_a_single_worker_needs_only_its_own() -> None:
    board = StandbyBoard()
    assert not board.all_took_own(1, since=0.0, now=10.0)  # nothing stamped yet: never taken as done
    board.took_own(256 + 1, now=1.0)
    assert board.all_took_own(2, since=0.0, now=10.0) is False  # slot 0 still unstamped
    board.took_own(0, now=2.0)
    assert board.all_took_own(2, since=0.0, now=10.0)


def test_the_board_is_shared_with_the_processes_forked_after_it_was_made() -> None:
    """gunicorn's master makes it (gunicorn.conf.py imports the module), then forks the workers."""
    board = StandbyBoard()
    child = os.fork()
    if child == 0:  # the worker of slot 1
        board.took_own(1, now=7.0)
        os._exit(0)
    _, status = os.waitpid(child, 0)
    assert status == 0
    board.took_own(0, now=8.0)
    assert board.all_took_own(2, since=0.0, now=8.0 + SETTLE)


class SubscribingWire:
    """What an owner's `setup` asks of a wire, recording the partitions subscribed to."""

    def __init__(self) -> None:
        self.subscribed: list[str] = []
        self._channels = 0

    def confirmed_channel(self) -> Any:
        return self.channel_for(acks=True)

    def channel_for(self, acks: bool) -> Any:
        self._channels += 1
        return type("Channel", (), {"channel_id": self._channels})()

    def consume(self, _channel: Any, queue: str, _callback: Any, acks: bool, nowait: bool) -> None:
        self.subscribed.append(queue)


def test_an_owner_subscribes_to_its_own_at_once_and_to_the_rest_once_its_instance_took_theirs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitions_module.routes, "declare", lambda _wire, _arguments: 16)
    board, wire = StandbyBoard(), SubscribingWire()
    owner = PartitionOwner(1, 4, wake=lambda: None, board=board)
    owner.setup(wire, now=1000.0)  # type: ignore[arg-type]
    assert wire.subscribed == [f"warren.routes.{p}" for p in (1, 5, 9, 13)]
    assert board.all_took_own(2, since=999.0, now=1000.0 + SETTLE) is False  # slot 0 has not
    owner.tick(1000.0 + 10)  # slots 0, 2 and 3 have not taken theirs: standing by now would take them
    assert len(wire.subscribed) == 4
    for slot, at in ((0, 1003.0), (2, 1004.0), (3, 1012.0)):
        board.took_own(slot, now=at)
    owner.tick(1012.0 + SETTLE)
    assert sorted(wire.subscribed[4:]) == sorted(f"warren.routes.{p}" for p in range(16) if p % 4 != 1)


def test_an_owner_stands_by_after_standby_max_whatever_the_board_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(partitions_module.routes, "declare", lambda _wire, _arguments: 16)
    board, wire = StandbyBoard(), SubscribingWire()
    owner = PartitionOwner(0, 12, wake=lambda: None, board=board)
    owner.setup(wire, now=1000.0)  # type: ignore[arg-type]
    owner.tick(1000.0 + STANDBY_MAX - 1)
    assert wire.subscribed == ["warren.routes.0", "warren.routes.12"]
    owner.tick(1000.0 + STANDBY_MAX)
    assert len(wire.subscribed) == 16


def test_a_worker_that_lost_its_connection_is_waited_for_until_it_takes_its_own_again() -> None:
    """RabbitMQ closed both workers' connections: the first back must not stand by for the other's
    partitions on the strength of that one's stamp from before its loss."""
    board = StandbyBoard()
    board.took_own(0, now=100.0)
    board.took_own(1, now=100.5)
    board.left(1)
    board.took_own(0, now=102.0)  # worker 0 reconnected first
    assert not board.may_stand_by(2, connected_at=102.0, now=110.0)
    board.took_own(1, now=111.0)
    assert board.may_stand_by(2, connected_at=102.0, now=111.0 + SETTLE)
