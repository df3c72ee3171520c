"""Erlang/OTP-style supervision for gevent greenlets: the package's whole surface.

Reading order:
  childspec.py    child specs, restart types, shutdown values, the restart budget (MaxR in MaxT)
  actor.py        a greenlet with an inbox: every supervisor does its work in one
  shutdown.py     how a child is stopped (brutal_kill, a grace in seconds, infinity)
  reports.py      where crashes, restarts and give-ups are reported (one Reporter per process)
  supervisor.py   the Supervisor: one_for_one, one_for_all, rest_for_one, simple_one_for_one
  connections.py  the ConnectionSupervisor, after Ranch's conns_sup: a worker's connections,
                  temporary children started from the accept callback in O(1), counted and capped

The dynamic part of OTP's API (`start_child`, `terminate_child`, `restart_child`,
`delete_child`, `which_children`, `count_children`, `simple_one_for_one`) is kept
as documented surface: the worker's tree uses only static specs today, but a
supervisor without it is not the one OTP users know, and the unit tier proves
every call of it.
"""

from app.supervision.childspec import (
    CHILD_TYPES,
    RESTART_TYPES,
    Child,
    ChildSpec,
    ChildSupervisor,
    RestartBudget,
    SupervisorGaveUp,
)
from app.supervision.connections import ConnectionSupervisor
from app.supervision.reports import Reporter, report_crash, set_reporter
from app.supervision.shutdown import ShutdownKill
from app.supervision.supervisor import STRATEGIES, Supervisor

__all__ = ["CHILD_TYPES", "RESTART_TYPES", "STRATEGIES", "Child", "ChildSpec", "ChildSupervisor",
           "ConnectionSupervisor", "Reporter", "RestartBudget", "ShutdownKill", "Supervisor", "SupervisorGaveUp",
           "report_crash", "set_reporter"]
