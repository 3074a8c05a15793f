# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install sdd.
# TORCH: the torch requirement installed first; the default is this project's CPU wheel. On a GPU
# host, set it to the build your cluster uses, e.g. `make test TORCH="torch==2.11.0"`.
# EXTRAS: the optional dependency groups installed with sdd, e.g. `DS_BUILD_OPS=0 make install EXTRAS=dev,deepspeed`
# (CI does; the sharded tests in tests/test_sharded.py need DeepSpeed).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO_ROOT ?= runs/toy-exp
SEEDS ?= 3
EXTRAS ?= dev

.PHONY: install test test-slow demo lint clean gpu-check

$(BIN)/sdd: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/sdd

test: install
	$(BIN)/pytest -q

test-slow: install
	$(BIN)/pytest -q -m slow

lint: install
	$(BIN)/ruff check sdd tests benchmarks

# The toy experiment end to end: every variant, SEEDS seeds, two jobs side by side, then the report.
demo: install
	$(BIN)/sdd run examples/recipes/toy.yaml --root $(DEMO_ROOT) --seeds $(SEEDS) --jobs 2
	$(BIN)/sdd report $(DEMO_ROOT)

# The GPU acceptance run (docs/benchmarks.md): about 10 minutes on one H100/H200, one JSON with every figure.
# Uses $(PYTHON) from PATH (the GPU image's torch), not .venv; installs .whl/ into a temp dir if trl & co. are missing.
GPU_CHECK_OUT ?= gpu-check.json
gpu-check:
	PYTHONPATH=$(CURDIR) $(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

clean:
	rm -rf runs
