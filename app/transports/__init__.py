"""Device transports: they turn a socket into decoded frames, and know a session only through its port.

Each transport is a `FrameConnection` (app/sessions/ports.py): `receive()`
returns one decoded frame (or None once the peer is gone), `send()` encodes and
queues one frame without blocking, `commands_flow` says whether a command may
be written now (the session holds the others), `finish()` cuts the connection
once what is queued is written (without blocking its caller), and `close()`
flushes briefly and closes.

Reading order:
  sockets.py         `read` and `abort`: the two socket calls every transport shares
  sender.py          `Sender`, the bounded non-blocking outgoing buffer every transport writes through
  json_lines.py      JSON lines over a stream socket, plain or TLS (presence `tcp`, `tls`)
  ws_frames.py       RFC 6455 frames, sans-I/O: a strict reader of client frames and the server's frame builders
  websocket.py       the handshake, then one upgraded connection: data messages up, pings and the close
                     handshake answered without waking the session; shared by both below
  json_websocket.py  JSON over WebSocket, one text message per frame (`ws`, `wss`)
  mqtt_streams.py    MQTT's byte stream over a socket or over a WebSocket's binary messages
  mqtt.py            MQTT packets as session frames (`mqtt`, `mqtts`, `mqtt-ws`, `mqtt-wss`)
"""
