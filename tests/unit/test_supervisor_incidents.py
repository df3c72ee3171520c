"""Regressions from incidents: mass disconnects, and a crash loop escalating to the process's exit code."""

from gevent import monkey

monkey.patch_all()

import os
import socket
import subprocess
import sys
import textwrap

import gevent
import pytest

from app.supervision import ConnectionSupervisor, Reporter, set_reporter

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CrashLog(Reporter):
    def __init__(self) -> None:
        self.crashes: list[str] = []

    def crash(self, supervisor: str, child_id: str, exc: BaseException) -> None:
        self.crashes.append(child_id)


@pytest.fixture
def crash_log():
    reporter = CrashLog()
    set_reporter(reporter)
    yield reporter
    set_reporter(None)


def hold_connection(sock: socket.socket) -> None:
    """A session in miniature: ends normally when the peer closes, crashes on a reset."""
    try:
        while sock.recv(1024):
            pass
    finally:
        sock.close()


def test_thousands_of_sessions_ending_at_once_leave_the_others_alone(crash_log):
    """Regression: 2,000 of 5,000 connections dropping at once must not disturb the other 3,000."""
    conns = ConnectionSupervisor("connections", max_open=10_000).start()
    pairs = [socket.socketpair() for _ in range(5000)]
    children = [conns.spawn(hold_connection, ours) for ours, _ in pairs]
    try:
        assert conns.open == 5000

        for _, peer in pairs[:2000]:
            peer.close()
        gevent.joinall(children[:2000])

        assert conns.open == 3000  # exact: each child is dropped before anyone waiting on it wakes
        assert all(child.successful() for child in children[:2000])  # ended normally: nothing to restart
        survivors = children[2000:]
        assert all(child and not child.dead for child in survivors)
        assert not conns.dead and not conns.full
    finally:
        conns.stop()
        for ours, peer in pairs:
            ours.close()
            peer.close()
    assert all(child.dead for child in children)
    assert conns.open == 0 and conns.wait(timeout=0) is True
    assert crash_log.crashes == []  # stop() makes every report queued before it exits


ESCALATION_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import os
import gevent
from app.supervision import ChildSpec, Supervisor

def crashing_worker():
    def run():
        gevent.sleep(0.01)
        raise RuntimeError("worker crashed")
    return gevent.spawn(run)

def start_branch():
    return Supervisor("branch", children=[ChildSpec("worker", crashing_worker)], max_restarts=2).start()

root = Supervisor("root", children=[ChildSpec("branch", start_branch, type="supervisor", shutdown="infinity")],
                  max_restarts=2).start()
root.rawlink(lambda sup: os._exit(70))
root.wait()
os._exit(0)  # not reached: the rawlink exits first, and wait() raises SupervisorGaveUp
"""


def test_crash_loop_escalates_through_two_levels_to_process_exit_code(tmp_path):
    script = tmp_path / "escalate.py"
    script.write_text(textwrap.dedent(ESCALATION_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": REPO_ROOT},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 70, result.stderr[-3000:]
    assert result.stderr.count("supervisor branch gave up") == 3  # the root restarted it twice
    assert "supervisor root gave up" in result.stderr
