"""The WSGI entry point: `gunicorn -c gunicorn.conf.py wsgi:app`."""

from app.config import load
from app.web.api import WarrenApp

app = WarrenApp(load())
