"""The HTTP side of a worker (PROTOCOL.md section 6), on pywsgi.

Reading order:
  api.py      the WSGI app: routes, the command API, operators' questions, ops endpoints
  openapi.py  its OpenAPI 3.1 description, as data (a unit test holds the two equal)
  status.py   the status page and /status.json, read from the instance's metrics
"""
