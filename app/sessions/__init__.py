"""Device sessions, knowing nothing of sockets or RabbitMQ.

Reading order:
  ports.py     who calls whom: what a session needs (a frame connection, a backend, a host), what the registry
               needs of RabbitMQ (Outbound) and offers it (Inbound), and Command, what the broker hands over
  limits.py    the token bucket behind every rate limit
  session.py   one device's protocol state machine (PROTOCOL.md sections 2-4), the one holder of its commands
  registry.py  a worker's live sessions: admission, takeover, commands to sessions, presence
  watchdog.py  one sweep per worker for hello and idle deadlines, instead of a timer per read
"""
