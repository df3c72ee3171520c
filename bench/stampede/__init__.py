"""`python -m bench.stampede`: a load tool that plays many devices and a backend against a Warren.

Layout, in reading order:
  links.py       framing: newline-delimited JSON over TCP, JSON text messages over WebSocket
  device.py      one simulated device (connect, hello, heartbeat, events, replies, reconnect)
  worker.py      a load process: up to ~18,000 devices under gevent, driven over stdin/stdout
  backend.py     the backend side: commands via RabbitMQ or HTTP, event verification
  gauges.py      the gateway's cost: process-tree RSS/PSS and CPU, RabbitMQ memory
  controller.py  spawns workers, aggregates their counters, prints progress
  scenarios.py   ramp, hold, stampede, kill-load
  measure.py     one scenario against the floor, then the gateway; writes the results
  units.py       CPU per unit of work (set-up, heartbeat, command, event), floor beside gateway
  report.py      table, JSON and PNG
  suite.py       starts the floor and the gateway (from any checkout) and runs every scenario
"""
