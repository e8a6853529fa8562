# loom — the two commands a user needs: `make demo` (the main job) and `make test` (the whole suite).
# Both work on a fresh Debian machine as root: they install what is missing, then run.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian packages the project needs at run or test time: netfilter tools and iproute2 for capture and
# the lab, tcpdump for the wire evidence, curl and Node.js (nghttp2) as independent HTTP/2 peers in the
# HBONE tests.
DEB_PACKAGES := iproute2 iptables nftables tcpdump procps curl nodejs stunnel4

.PHONY: test demo lint typecheck unit deps venv protos clean

deps:
	@missing=""; for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to install:$$missing" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "loom needs Python >= 3.11")'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

protos: venv
	$(PY) -m loom.api.generate

test: deps venv lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider

demo: deps venv
	$(VENV)/bin/loomctl demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
