# The interface in ../shared/DESIGN.md: setup, demo, test, bench (+ lint). Every target goes through
# `make setup`, which is idempotent: the venv is rebuilt only when setup.cfg changes.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Build needs of ffcv 1.0.2 (pkg-config opencv4, libturbojpeg) and the Slurm test cluster.
APT_PACKAGES := pkg-config g++ libopencv-dev libturbojpeg0-dev \
	slurmctld slurmd slurm-client munge slurmdbd mariadb-server
TEST_ARGS ?=

.PHONY: setup system-packages demo test bench lint clean

setup: $(STAMP)

# As root (CI, a fresh machine), install what is missing; otherwise say what a user must install.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make setup: installing system packages: $$missing"; \
		apt-get update -q >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	else \
		echo "make setup: not root or no apt-get; install these yourself if a step below fails: $$missing" >&2; \
	fi

$(STAMP): setup.cfg pyproject.toml | system-packages
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: ffcv's dependency pytorch_pfn_extras would otherwise pick its own torch build.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/pml-dist run --config configs/demo.yaml

test: setup
	$(PY) -m pytest $(TEST_ARGS)

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	$(PY) -c "import configparser, subprocess, sys; c = configparser.ConfigParser(); c.read('setup.cfg'); \
		args = [a for k, v in c['tool:ruff'].items() for a in ('--config', f'{k} = {v}')]; \
		sys.exit(subprocess.call(['$(VENV)/bin/ruff', 'check', *args, '.']))"

clean:
	rm -rf $(VENV) build *.egg-info
