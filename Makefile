# The two commands README.md documents:
#   make demo   - set up everything, then run the demo lab (real VPN peers through vpnmasq)
#   make test   - set up everything, then run the whole test suite (lint, types, layers, tests)
.PHONY: setup demo test lint unit bench fuzz wheel deb clean

setup:
	@./scripts/setup.sh

demo: setup
	.venv/bin/vpnmasq demo

lint: setup
	.venv/bin/ruff check src lab tests bench fuzz scripts
	.venv/bin/mypy src/vpnmasq lab/vpnmasq_lab
	.venv/bin/lint-imports

test: lint
	.venv/bin/pytest tests -q

unit: setup
	.venv/bin/pytest tests -q --ignore=tests/integration --ignore=tests/e2e

bench: setup
	.venv/bin/python bench/run.py

# coverage-guided fuzzing (atheris) of every parser and the engine; FUZZ_SECONDS per target
FUZZ_SECONDS ?= 60
fuzz: setup
	.venv/bin/python fuzz/run.py --seconds $(FUZZ_SECONDS)

# the gateway's wheel (no lab) and its Debian 12 package, in dist/ (README: Installing it)
wheel: setup
	.venv/bin/pip wheel -q --no-deps -w dist .

deb: setup
	./scripts/build-deb.sh dist
	lintian dist/vpnmasq_$$(dpkg-parsechangelog -S Version)_all.deb

clean:
	rm -rf dist .venv .pytest_cache .mypy_cache .ruff_cache .hypothesis
