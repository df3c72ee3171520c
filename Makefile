# Two commands: `make run` starts the gateway, `make test` runs the whole suite;
# `make test-fast` runs the unit tier alone (in-process, no RabbitMQ, seconds).
# Both create .venv and install the pinned requirements first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-fast lint rabbitmq

$(BIN)/activate: requirements.txt tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r tests/requirements.txt
	touch $(BIN)/activate

run: $(BIN)/activate
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(BIN)/activate rabbitmq
	@./.ci/ensure-chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

test-fast: $(BIN)/activate
	$(BIN)/python -m pytest -q tests/unit

lint: $(BIN)/activate
	$(BIN)/ruff check .

# Make sure RabbitMQ answers on 127.0.0.1:5672 (tests talk to the real broker).
rabbitmq:
	@./.ci/ensure-rabbitmq
