# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install sdd from the
# lock file (requirements.lock: every package at the exact version the results were measured with).
# TORCH: the torch requirement installed first; the default is this project's CPU wheel. The lock leaves torch
# out so that a GPU host can set the build its cluster uses, e.g. `make test TORCH="torch==2.11.0"`.
# EXTRAS: optional dependency groups besides dev, peft and trackio (all three in requirements.lock). One with a lock of its own
# (requirements-<extra>.lock) installs from it, e.g. `DS_BUILD_OPS=0 make install EXTRAS=dev,deepspeed` (CI does;
# the sharded tests in tests/test_sharded.py need DeepSpeed); one without (vllm) from pyproject.toml's ranges.
# `make lock` refreshes the lock files from pyproject.toml's ranges (README, "Installing from the lock").
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
LOCK ?= requirements.lock
BIN := $(VENV)/bin
DEMO_ROOT ?= runs/toy-exp
SEEDS ?= 3
EXTRAS ?= dev
comma := ,
space := $() $()
EXTRA_NAMES := $(filter-out dev,$(subst $(comma), ,$(EXTRAS)))
EXTRA_LOCKS := $(foreach extra,$(EXTRA_NAMES),$(wildcard requirements-$(extra).lock))
UNLOCKED_EXTRAS := $(foreach extra,$(EXTRA_NAMES),$(if $(wildcard requirements-$(extra).lock),,$(extra)))
# What a run's numbers depend on besides the lock and the recipe: the thread count. A matmul summed by 2 threads
# adds in another order than by 1, so the demo fixes 1 thread per stage process (`sdd run` would otherwise give
# each of its --jobs workers cpu_count/jobs threads: 1 here, 2 on a 4-core machine). docs/results.md has the checks.
DEMO_ENV := OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1

.PHONY: install test test-slow demo lint clean gpu-check lock

# The lock's packages with --no-deps: exactly what it lists, nothing a resolver picks on the day; pip check
# then fails the install if the lock is incomplete or inconsistent.
$(BIN)/sdd: pyproject.toml $(LOCK) $(EXTRA_LOCKS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK) $(addprefix -r ,$(EXTRA_LOCKS))
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(if $(UNLOCKED_EXTRAS),$(BIN)/python -m pip install -q -e ".[$(subst $(space),$(comma),$(strip $(UNLOCKED_EXTRAS)))]")
	$(BIN)/python -m pip check
	touch $@

install: $(BIN)/sdd

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check sdd tests benchmarks
	$(BIN)/lint-imports

# The toy experiment end to end: every variant, SEEDS seeds, two jobs side by side, then the report.
demo: install
	$(DEMO_ENV) $(BIN)/sdd run examples/recipes/toy.yaml --root $(DEMO_ROOT) --seeds $(SEEDS) --jobs 2
	$(DEMO_ENV) $(BIN)/sdd report $(DEMO_ROOT)

# The GPU acceptance run (docs/benchmarks.md): about 10 minutes on one H100/H200, one JSON with every figure.
# Uses $(PYTHON) from PATH (the GPU image's torch), not .venv; installs .whl/ into a temp dir if trl & co. are missing.
GPU_CHECK_OUT ?= gpu-check.json
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf runs

# Refresh the lock files: a fresh venv, TORCH, then sdd with its dev extra (requirements.lock) and its deepspeed
# extra (requirements-deepspeed.lock: what that adds) at the newest versions pyproject.toml's ranges allow.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(LOCK_VENV)/bin/python -m pip install -q -e ".[dev,peft,trackio]"
	$(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^torch==' > $(LOCK_VENV)/base.txt
	DS_BUILD_OPS=0 $(LOCK_VENV)/bin/python -m pip install -q -e ".[dev,deepspeed]"
	$(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^torch==' | grep -vxFf $(LOCK_VENV)/base.txt \
		> $(LOCK_VENV)/deepspeed.txt
	{ echo "# Exact versions for make demo / make test: written by \`make lock\` ($$(date -u +%F), $$($(LOCK_VENV)/bin/python -V),"; \
	  echo "# $$($(LOCK_VENV)/bin/python -m pip freeze | grep '^torch==') installed first, as TORCH; not listed here)."; \
	  cat $(LOCK_VENV)/base.txt; } > $(LOCK)
	{ echo "# What sdd's deepspeed extra adds to $(LOCK) (make install EXTRAS=dev,deepspeed): written by \`make lock\`."; \
	  cat $(LOCK_VENV)/deepspeed.txt; } > requirements-deepspeed.lock
	rm -rf $(LOCK_VENV)
