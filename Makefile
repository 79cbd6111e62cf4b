# hub-gateway: `make demo` and `make test` work on a fresh Debian/Ubuntu machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck mosquitto venv clean schema dist

venv: $(VENV)/.installed

# Create the virtualenv (installing python3-venv first if this Debian lacks it) and install
# the project with its test tools. Re-runs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null || \
	  { echo "installing python3-venv"; $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

# Integration tests start their own Mosquitto processes; install the broker if missing.
mosquitto:
	@command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || { \
	  echo "installing mosquitto"; \
	  $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; }

demo: venv mosquitto
	$(BIN)/hub-gateway demo

lint: venv
	$(BIN)/ruff check gateway tests bench

typecheck: venv
	$(BIN)/mypy gateway

test: venv mosquitto lint typecheck
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) demo-out dist .pytest_cache .mypy_cache .ruff_cache

# An offline install kit in dist/: the project and every dependency as wheels for one platform
# (pip platform tag) and Python, with install.sh, the unit and the examples; installed on the
# gateway with `install.sh --offline FILE`, no network (docs/install.md). Builds in a venv of its
# own, not .venv. Debian 12 / Raspberry Pi OS 64-bit: glibc 2.36, Python 3.11 (the defaults);
# Debian 13: PLATFORM=manylinux_2_41_<arch> PYTHON_VERSION=3.13.
PLATFORM ?= manylinux_2_36_$(shell uname -m)
PYTHON_VERSION ?= 3.11
dist:
	PYTHON=$(PYTHON) systemd/dist.sh $(PLATFORM) $(PYTHON_VERSION) dist

# Regenerate the shipped JSON Schemas from the config models (a test checks they match).
schema: venv
	$(BIN)/hub-gateway schema gateway > config/schema/gateway.schema.json
	$(BIN)/hub-gateway schema devices > config/schema/devices.schema.json
