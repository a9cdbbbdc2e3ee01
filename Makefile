# dockvm's entry points. Everything runs on this machine: see scripts/ and DESIGN.md.
#   make run    install, start the local stack (3 Docker hosts on an OVS fabric) and the services
#   make test   install, start the local stack, run the unit and integration tests
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

DOCKVM_STATE_DIR ?= /var/lib/dockvm
export DOCKVM_STATE_DIR
PYTEST_ARGS ?=
VENV := .venv
PYTEST := $(VENV)/bin/pytest

.PHONY: help install stack run stop status test unit bench chaos clean image compose-up compose-down

help:
	@echo "make install|run|stop|status|test|unit|bench|chaos|clean|image|compose-up|compose-down  (PYTEST_ARGS='...' for test/unit)"

install:
	scripts/install.sh

stack: install
	scripts/stack.sh up

run: stack
	scripts/services.sh start

stop:
	scripts/services.sh stop
	scripts/stack.sh down

status:
	@scripts/stack.sh status || true
	@echo
	@scripts/services.sh status || true

# Both tiers; pytest's own options live in pyproject.toml. Exit code 5 (nothing collected)
# fails the target like any other.
test: stack
	$(PYTEST) $(PYTEST_ARGS)

unit: install
	$(PYTEST) -m unit $(PYTEST_ARGS)

# Each bench/<area>.py is a program (run as a module, so that bench/_common.py is importable).
bench: stack
	@for f in bench/[a-z]*.py; do m=$${f%.py}; echo "== $$m"; $(VENV)/bin/python -m $${m//\//.}; done

# The chaos suite (chaos/, docs/reliability.md), full rounds, on its own stack, RabbitMQ node
# and FerretDB (chaos/infra.py). It restarts the shared dockerd: that disturbs anything else
# running on this machine.
# CHAOS_ARGS='--quick' runs one round of each. Then schemathesis over the API, 1,000 cases, and
# ipam's long contention round (64 requesters, 4 replicas, 768 cycles; make test runs a short one).
CHAOS_ARGS ?=
chaos: stack
	$(VENV)/bin/python -m chaos $(CHAOS_ARGS)
	$(VENV)/bin/python -m bench.schema_fuzz --cases 1000
	DOCKVM_IPAM_RACE=long $(PYTEST) tests/integration/test_ipam_races.py

# The dockvm image (deploy/image/Dockerfile) from the local base, pushed to dc1; the control
# plane from it under docker-compose (compose/compose.sh, README "Deploying").
image: stack
	scripts/image.sh push

compose-up: image
	compose/compose.sh up

compose-down:
	compose/compose.sh down

# Stops everything, then removes the state (data, logs, images' registry storage). Asks nothing.
clean:
	scripts/services.sh stop
	scripts/stack.sh clean
	$(VENV)/bin/python -c 'import chaos.infra as i; i.clean()' 2>/dev/null || true
