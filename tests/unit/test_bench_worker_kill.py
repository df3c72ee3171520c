"""The worker-kill scenario's arithmetic (bench/stampede/worker_kill.py), on made-up logs.

The worker is killed at 1000.0: d1 and d2 were its devices, k1 and k2 another worker's.
"""

from __future__ import annotations

from bench.stampede.worker_kill import (
    connected_at,
    killed_worker,
    landed_on,
    offline_while_connected,
    other_workers,
    timelines,
)

KILLED = 1000.0
DEAD = {"d1", "d2"}
KEPT = {"k1", "k2"}
CHANGES = [("k2", "lost", 990.0), ("k2", "back", 991.0),  # before the kill: not the kill's
           ("d1", "lost", 1000.01), ("d2", "lost", 1000.02), ("d1", "back", 1000.5), ("d2", "back", 1001.0)]


def test_the_dead_workers_devices_are_lost_from_the_kill_until_their_comeback() -> None:
    lines = timelines(CHANGES, KILLED, DEAD)
    assert lines["d1"] == [("lost", KILLED), ("back", 1000.5)]  # its own loss, logged later, is the kill's
    assert "k2" not in lines
    assert [connected_at(lines["d1"], t) for t in (999.0, 1000.2, 1000.5, 1003.0)] == [True, False, True, True]
    assert connected_at([], 1003.0) is True  # a device with no change kept its session


def test_offline_counts_only_while_the_device_had_a_session() -> None:
    lines = timelines(CHANGES, KILLED, DEAD)
    settled = [(1000.2, "d1", "failed:offline", 1000.21),  # away: offline is the truth
               (1000.6, "d1", "failed:offline", 1000.61),  # back since 1000.5: a wrong offline
               (1002.0, "k1", "returned_offline", 1002.01),  # never lost: a wrong offline
               (1003.0, "k1", "timeout", 1010.0)]
    assert offline_while_connected(settled, lines, since=995.0, until=1005.0) == 2
    assert offline_while_connected(settled, lines, since=1001.0, until=1005.0) == 1


def test_the_other_workers_devices_count_every_command_after_the_kill() -> None:
    lines = timelines(CHANGES + [("k1", "lost", 1002.0)], KILLED, DEAD)
    settled = [(995.0, "k1", "ok", 995.004), (999.8, "k2", "ok", 999.81),  # before; in flight at the kill
               (1000.1, "d1", "failed:offline", 1000.11),  # the dead worker's: not counted here
               (1000.3, "k1", "ok", 1000.31), (1001.0, "k2", "timeout", 1008.0), (1003.0, "k1", "ok", 1003.02),
               (1012.0, "k1", "ok", 1012.01)]  # after the window
    figures = other_workers(settled, lines, KEPT, since=990.0, killed=KILLED, until=1010.0)
    assert (figures["sent_before_loss"], figures["sent_after_loss"]) == (1, 3)
    assert figures["in_flight_at_loss"] == {"ok": 1}
    assert figures["failed_after_loss"] == {"timeout": 1} and figures["missed_after_loss"] == 1
    assert figures["round_trip_after_loss_ms"]["n"] == 2 and figures["round_trip_after_loss_ms"]["max"] == 20.0
    assert figures["sessions_lost"] == 1


def test_a_comeback_is_timed_to_the_first_answer_to_a_command_sent_after_it() -> None:
    lines = timelines(CHANGES, KILLED, DEAD)
    settled = [(1000.2, "d1", "failed:offline", 1000.21),
               (1000.4, "d2", "ok", 1001.05),  # sent while away, answered after its comeback: not its answer
               (1000.55, "d1", "ok", 1000.6),
               (1001.1, "d2", "failed:offline", 1001.11), (1001.6, "d2", "ok", 1001.61),
               (1010.0, "d1", "ok", 1010.01)]  # the sweep's: not counted
    figures = killed_worker(settled, lines, DEAD, killed=KILLED, sweep_started=1009.0)
    assert (figures["devices"], figures["back"], figures["back_never_answered"]) == (2, 2, 0)
    assert figures["first_command_after_comeback_ms"]["max"] == 100.0  # d2's first, 0.1 s after it came back
    assert figures["answered_after_comeback_ms"]["max"] == 610.0  # d2: back at 1001.0, answered at 1001.61
    assert figures["answered_after_first_command_ms"]["max"] == 510.0
    assert figures["answered_within_target"] == 2
    assert figures["commands_while_away"] == {"failed:offline": 1, "ok": 1}
    assert figures["commands_after_comeback"] == {"ok": 2, "failed:offline": 1}
    assert figures["offline_while_connected"] == 1
    assert figures["offline_after_comeback_examples"] == [["d2", 100.0]]


def test_where_the_dead_workers_devices_landed() -> None:
    landed = {11: {"k1", "d1"}, 13: {"d2", "k2"}}  # 11 lived; 13 is gunicorn's new worker
    assert landed_on(landed, DEAD, survivors={11}) == {"surviving_workers": 1, "new_worker": 1}
