"""`python -m bench.mqtt_peers`: Warren next to RabbitMQ's MQTT plugin and Mosquitto, one MQTT load for all.

Layout, in reading order:
  servers.py   start and stop each server: Warren (gunicorn, on the machine's RabbitMQ), a RabbitMQ node
               of its own with rabbitmq_mqtt, a private Mosquitto
  backend.py   the backend side: stamped commands and every event, over AMQP (Warren) or MQTT (the peers)
  measure.py   one server's turn on bench.stampede's controller and scenarios: ramp, keep-alive, events,
               commands, mass drop
  figures.py   costs per unit of work from the marks, the rows compared, Warren against RabbitMQ
  output.py    table, Markdown page, plot, JSON

The devices are bench.stampede's MQTT 3.1.1 devices: Warren's dialect for Warren, the `broker` dialect
(the same client, topics under devices/<id>/) for the peers.
"""
