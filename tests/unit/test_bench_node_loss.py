"""The node-loss scenario's arithmetic (bench/stampede/faults.py), on made-up command logs."""

from __future__ import annotations

from bench.stampede.faults import answered_share, recovery, sweep

KILLED = 1000.0


def test_recovery_is_the_last_failed_command_sent_after_the_loss() -> None:
    settled = [(990.0, "d1", "ok", 990.01), (999.0, "d2", "ok", 999.01), (999.9, "d8", "timeout", 1006.9),
               (1000.1, "d3", "returned_offline", 1000.11), (1000.2, "d4", "ok", 1000.21),
               (1002.5, "d5", "timeout", 1009.5), (1003.0, "d6", "ok", 1003.01), (1006.0, "d7", "timeout", 1013.0)]
    figures = recovery(settled, since=985.0, killed=KILLED, until=1005.0)
    assert figures["sent_before_loss"] == 2 and figures["failed_before_loss"] == 0
    assert figures["in_flight_at_loss"] == {"timeout": 1}  # d8, sent 0.1 s before the loss: on its way
    assert figures["sent_after_loss"] == 4
    assert figures["failed_after_loss"] == {"returned_offline": 1, "timeout": 1}
    assert (figures["first_failed_s"], figures["recovery_s"]) == (0.1, 2.5)  # d7 came after `until`


def test_no_failure_after_the_loss_is_a_recovery_of_nothing() -> None:
    figures = recovery([(999.0, "d1", "ok", 999.01), (1001.0, "d2", "ok", 1001.01)], since=990.0, killed=KILLED,
                       until=1010.0)
    assert (figures["first_failed_s"], figures["recovery_s"]) == (None, 0.0)


def test_a_swept_device_counts_once_answered_and_failures_say_when() -> None:
    settled = [(1004.0, "d0", "timeout", 1011.0),  # a random command before the sweep: not the sweep's
               (1005.0, "d1", "ok", 1005.01), (1005.5, "d2", "returned_offline", 1005.51),
               (1006.0, "d3", "timeout", 1013.0),
               (1030.0, "d2", "ok", 1030.01)]  # after the sweep ended: not the sweep's either
    figures = sweep(settled, started=1005.0, ended=1020.0, killed=KILLED, devices=3)
    assert figures["answered"] == 1
    assert figures["not_answered"] == {"returned_offline": 1, "timeout": 1}
    assert figures["last_failed_sent_after_loss_s"] == 6.0
    assert figures["started_after_loss_s"] == 5.0


def test_the_answered_share_is_binned_by_send_time() -> None:
    bins = answered_share([(-0.2, "ok"), (0.1, "ok"), (0.4, "timeout"), (0.6, "ok")], width=0.5)
    assert bins == [{"t": -0.5, "sent": 1, "share": 1.0}, {"t": 0.0, "sent": 2, "share": 0.5},
                    {"t": 0.5, "sent": 1, "share": 1.0}]
