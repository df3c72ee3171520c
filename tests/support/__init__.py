"""What the end-to-end tests (tests/test_*.py) are built on: real gateways, the devices that talk to them, RabbitMQ
from the tests' side. No tests here; test modules import from this package, never from one another.

pytest puts tests/ on sys.path (pyproject.toml's `pythonpath`), so these modules are `support.<module>`, from
`pytest` at the root and from `pytest tests/unit` alike. Read them in this order:

- waiting.py: WAIT (how long a check waits) and wait_until, which every other module polls with.
- gateways.py: a real `gunicorn -c gunicorn.conf.py wsgi:app` on free ports (start_gateway; `launch` with the
  fault tests' settings; `start_guarded` with OPS_TOKENS), the test secrets and tokens, and reading a gateway's
  metrics and health. conftest.py's `gateway` fixture is start_gateway.
- devices.py: JSON devices (clients/device.py) on TCP and WebSocket, and checks of the next frame
  (test_gateway.py, test_two_hosts.py, the MQTT and TLS tests).
- rabbitmq.py: events read off `devices.events` (EventTap, DurableQueue), routing probes, commands published by
  hand, and faults injected from the broker's side (rabbitmqctl, closed connections, Blackhole partitions).
- fault_devices.py: the fault tests' devices: frames read until one matches, round trips, raw TCP sessions.
- mqtt_devices.py: paho-mqtt as it is and a bare-socket MQTT client, over TCP or `GET /mqtt`.
- mqtt5_devices.py: a bare-socket MQTT 5 device (plain, TLS or `/mqtt`) that sees every packet and property.
- paho5_devices.py: paho-mqtt in MQTTv5 mode as it is, recording the gateway's DISCONNECT and SUBACK codes.
- tls_devices.py: a PKI, JSON devices over TLS and wss, paho over TLS, `openssl s_client`.
- cluster_clients.py: backends, held devices and command rounds for the two-node cluster tests.

The unit tier's own helpers (fakes.py, supervisor_probe.py) stay in tests/unit.
"""
