"""Every scenario by its command-line name (`python -m bench.stampede SCENARIO`, `suite --scenarios`)."""

from __future__ import annotations

from bench.stampede.faults import kill_load, node_loss
from bench.stampede.mass_reconnect import mass_reconnect
from bench.stampede.scenarios import hold, ramp, stampede
from bench.stampede.worker_kill import worker_kill

SCENARIOS = {"ramp": lambda run, options: {"ramp": ramp(run, options)},
             "hold": hold, "stampede": stampede, "kill-load": kill_load, "worker-kill": worker_kill,
             "mass-reconnect": mass_reconnect, "node-loss": node_loss}
