# Two entry points a newcomer needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: setup demo test protos clean

$(BIN)/farm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin torch first: an unpinned torch would pull the newest CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev,onnx]'
	touch $(BIN)/farm

setup: $(BIN)/farm

demo: setup
	$(BIN)/farm demo

# The multi-node tests make their own Ray cluster, and a process joins one cluster
# only: they run in a second pytest process.
test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q tests/cluster

# Regenerate farm/v1 from protos/ (the generated code is committed so that it is
# importable right after install; tests/unit/test_protos.py checks it is current).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/farm/v1/*.proto

clean:
	rm -rf $(VENV)
