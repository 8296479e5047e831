# The project's commands. A fresh machine needs only `make run` and `make test`.
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
export MLFLOW_ENABLE_TELEMETRY := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# Without this, OpenMP threads spin-wait and a loaded 2-core machine runs torch 10x slower.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install run test lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch goes first, pinned, so that no CUDA build is pulled by a range elsewhere. The rest
# installs at the versions of requirements/constraints.txt (torch aside: TORCH chooses it),
# so that a fresh machine gets the environment the images and the tests were checked with.
$(STAMP): $(BIN)/python pyproject.toml requirements/constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	grep -v '^torch==' requirements/constraints.txt > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job: the whole pipeline on the toy world with kfp.local, MLflow in runs/local
# (e.g. `make run RUN_ARGS="--preset ci"` for the tiny configuration of the tests).
run: $(STAMP)
	$(BIN)/unifl run $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Container images (needs a Docker engine): CPU and CUDA images of the package,
# and the MLflow server of k8s/. Push them with `docker push` to your registry.
IMAGE ?= unifl
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
MLFLOW_VERSION := $(shell sed -n 's/^mlflow==//p' requirements/mlflow-server.txt)

.PHONY: image constraints constraints-check
image:
	docker build -f docker/Dockerfile.cpu -t $(IMAGE):$(VERSION) .
	docker build -f docker/Dockerfile.cuda -t $(IMAGE):$(VERSION)-cuda .
	docker build -f docker/Dockerfile.mlflow -t $(IMAGE)-mlflow:$(MLFLOW_VERSION) .

# Pin the images to the versions of this environment (torch without its local build tag).
constraints: $(STAMP)
	{ sed -n '1,/^[^#]/{/^#/p}' requirements/constraints.txt; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -v '^pip==' \
	    | sed -E 's/^([A-Za-z0-9_.-]+==[^+]+)\+.*/\1/'; \
	} > requirements/constraints.txt.new && mv requirements/constraints.txt.new requirements/constraints.txt

# Resolve the package against the constraints on the package index (network, minutes).
constraints-check: $(STAMP)
	$(BIN)/pip install --dry-run --ignore-installed --quiet -c requirements/constraints.txt .
