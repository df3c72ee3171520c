"""`python -m bench.stampede`: a load tool that plays many devices and a backend against a Warren.

Layout, in reading order:
  links.py       framing: JSON lines over TCP, JSON text messages over WebSocket, MQTT over TCP or /mqtt
  mqtt_codec.py  a client's half of MQTT 3.1.1 (the tests' too): every client packet out; server packets in
  device.py      one simulated device's life (connect, open a session, serve it, reconnect)
  json_device.py   ... speaking JSON frames (hello, ping, event, reply)
  mqtt_device.py   ... speaking MQTT (CONNECT, SUBSCRIBE commands/#, PINGREQ, PUBLISH events/, replies/)
  mqtt5_codec.py   a client's half of MQTT 5.0 on mqtt_codec: CONNECT/SUBSCRIBE/PUBLISH out; server packets in
  mqtt5_device.py  ... the same device speaking MQTT 5.0 (`mqtt5://`, `mqtt5+ws://`; suite `--transport mqtt5`)
  worker.py      a load process: up to ~18,000 devices under gevent, driven over stdin/stdout
  backend.py     the backend side: commands via RabbitMQ or HTTP, event verification
  gauges.py      the gateway's cost: its process tree (sampled by bench/sampling.py), RabbitMQ memory
  controller.py  spawns workers, aggregates their counters, prints progress
  scenarios.py   ramp, hold, stampede, and the figures every scenario reads
  faults.py      kill-load, node-loss, and the arithmetic of recovery (commands answered by send time)
  worker_kill.py worker-kill: a gateway worker SIGKILLed, which devices it held, their comeback
  mass_reconnect.py  mass-reconnect: every connection cut with commands flowing (section 2.4 at scale)
  catalog.py     every scenario by its name
  measure.py     one scenario against the floor, then the gateway; writes the results
  units.py       CPU per unit of work (set-up, heartbeat, command, event), floor beside gateway
  report.py      table, JSON and PNG
  suite.py       starts the floor and the gateway (from any checkout) and runs every scenario
"""
