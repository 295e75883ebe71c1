# make demo: set up .venv and run the demo. make test: set up .venv (+ test extras and the
# Debian packages the network tests use, when run as root) and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEBIAN_PACKAGES := iproute2 nftables conntrack coturn redis-server chromium curl

.PHONY: demo test venv debian bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/tether demo

debian:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		missing=""; \
		for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
		if [ -n "$$missing" ]; then \
			echo "installing Debian packages:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
		fi; \
	else \
		echo "not root or no apt-get: skipping Debian packages ($(DEBIAN_PACKAGES)); namespace tests will skip"; \
	fi

test: venv debian
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/tether bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info
