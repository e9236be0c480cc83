# The two commands of the README: `make run` (a local cluster serving a tiny model it
# makes itself) and `make test` (the CPU test suite, what CI runs). Both set up what
# they need: the .venv with dependencies, and Debian's redis-server when missing.
SHELL := /bin/bash
PY := .venv/bin/python
STAMP := .venv/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
MODEL ?= models/tiny-llama

.PHONY: run test setup redis-server proto clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv .venv
	# torch first and pinned: 2.13.0 is the release this project is tested with (CPU build where one is at hand)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	rm -f .venv/.installed-* && touch $@

redis-server:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

$(MODEL)/config.json: | setup
	.venv/bin/semipd make-model --preset tiny-llama --out $(MODEL)

run: setup redis-server $(MODEL)/config.json
	.venv/bin/semipd serve --model $(MODEL) --self-test

test: setup redis-server
	$(PY) -m pytest -q -p no:cacheprovider

proto: setup
	$(PY) proto/generate.py

clean:
	rm -rf .venv models .pytest_cache
