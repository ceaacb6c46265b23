# Two entry points a newcomer needs: `make demo` and `make test`. Both set up .venv first,
# installing exactly what the lock file pins (requirements/*.txt, made by `make lock`).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# uv lives in its own small venv: `uv pip sync` removes from .venv whatever the lock
# does not name, and would otherwise remove uv itself.
TOOLS := .tools
UV_VERSION := 0.13.10
UV := $(TOOLS)/bin/uv

# A GPU node takes the lock with PyPI's CUDA build of torch and the `gpu` extra; every
# other machine the lock with the CPU build (`LOCK=...` chooses by hand).
LOCK ?= requirements/$(if $(shell command -v nvidia-smi 2>/dev/null),gpu,cpu).txt
# The CPU build of torch (2.13.0+cpu) is not on PyPI: take it from a local wheel
# directory where this machine has one, else from PyTorch's CPU index.
TORCH_WHEELS ?= /opt/wheels
CPU_TORCH_SOURCE := $(if $(wildcard $(TORCH_WHEELS)/torch-*+cpu-*.whl),--find-links $(TORCH_WHEELS),--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"

.PHONY: setup lock demo test protos clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv==$(UV_VERSION)

$(BIN)/farm: pyproject.toml $(LOCK) | $(UV)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(UV) pip sync -q --python $(BIN)/python $(CPU_TORCH_SOURCE) $(LOCK)
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $(BIN)/farm

setup: $(BIN)/farm

# Refresh the locks on purpose: keeps every pin it can (UPGRADE=1 takes the newest of
# everything). The GPU lock is constrained to the CPU lock's versions, so a GPU node runs
# what CI tested; only torch's build and what only GPUs need differ.
lock: | $(UV)
	$(UV) pip compile -q pyproject.toml requirements/cpu.in --extra dev --extra onnx $(LOCK_TARGET) \
	  $(CPU_TORCH_SOURCE) $(if $(UPGRADE),--upgrade) -o requirements/cpu.txt
	grep -v '^torch==' requirements/cpu.txt > $(TOOLS)/cpu-pins.txt
	$(UV) pip compile -q pyproject.toml requirements/gpu.in --extra gpu --extra dev $(LOCK_TARGET) \
	  -c $(TOOLS)/cpu-pins.txt $(if $(UPGRADE),--upgrade) -o requirements/gpu.txt

demo: setup
	$(BIN)/farm demo

# The multi-node tests make their own Ray cluster, and a process joins one cluster
# only: they run in a second pytest process.
test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q tests/cluster

# Regenerate farm/v1 from protos/ with the locked grpcio-tools (the generated code is
# committed so that it is importable right after install; tests/unit/test_protos.py
# checks it is byte-identical to what the locked protoc writes).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/farm/v1/*.proto

clean:
	rm -rf $(VENV) $(TOOLS)
