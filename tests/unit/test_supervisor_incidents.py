from gevent import monkey

monkey.patch_all()

import os
import socket
import subprocess
import sys
import textwrap
import time

import gevent

from app.supervisor import ChildSpec, Supervisor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for condition"
        gevent.sleep(0.01)


def hold_connection(sock: socket.socket) -> None:
    """A session in miniature: ends normally when the peer closes, crashes on a reset."""
    try:
        while sock.recv(1024):
            pass
    finally:
        sock.close()


def test_thousands_of_sessions_ending_at_once_leave_the_others_alone():
    """Regression: 2,000 of 5,000 connections dropping at once must not disturb the other 3,000."""
    sessions = Supervisor(
        "connections",
        "simple_one_for_one",
        [ChildSpec("connection", gevent.spawn, (hold_connection,), restart="temporary", shutdown="brutal_kill")],
    ).start()
    pairs = [socket.socketpair() for _ in range(5000)]
    children = [sessions.start_child(ours) for ours, _ in pairs]
    try:
        assert sessions.count_children()["active"] == 5000

        for _, peer in pairs[:2000]:
            peer.close()
        wait_until(lambda: sessions.count_children()["active"] == 3000)

        survivors = children[2000:]
        assert all(child and not child.dead for child in survivors)
        assert [child for _, child, _ in sessions.which_children()] == survivors
        assert all(child.dead for child in children[:2000])
        assert sessions.exception is None and sessions.wait(timeout=0) is False
        assert sessions.restarts_total == 0
        assert sessions.count_children()["active"] == 3000
    finally:
        sessions.stop()
        for ours, peer in pairs:
            ours.close()
            peer.close()
    assert all(child.dead for child in children)


ESCALATION_SCRIPT = """
from gevent import monkey
monkey.patch_all()
import os
import gevent
from app.supervisor import ChildSpec, Supervisor

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
