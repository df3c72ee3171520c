"""TLS for devices and the HTTP port (PROTOCOL.md section 1, TLS).

Reading order:
  contexts.py   settings checked at start-up, contexts built once in the master (shared ticket
                keys), device names read from client certificates
  handshake.py  handshakes in the connection's greenlet, under a deadline, paced by a gate
  crl.py        revoked device certificates (TLS_CRL_FILE): parsed and verified, watched by each worker
"""
