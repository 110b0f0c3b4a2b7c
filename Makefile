# ctrain: the two commands are `make demo` and `make test`. Everything else is a helper.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export CTRAIN_HOME ?= $(CURDIR)/.ctrain

.PHONY: install demo test test-fast lint images images-stop up down clean bench

## install: create .venv from the pinned lock (a second run is a no-op unless the lock changed)
install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml training_image/pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e . -e training_image
	@touch $(STAMP)

## demo: generate data, run a pipeline's DAG end to end on embedded defaults, print a summary
##       (PIPELINE=<name> picks pipelines/<name>.yaml; default fraud). CTRAIN_LAUNCHER=docker trains in the
##       training image (built or reused by scripts/images.sh, on its engine).
PIPELINE ?= fraud
demo: install
	$(if $(filter docker,$(CTRAIN_LAUNCHER)),eval "$$(bash scripts/images.sh engine trainer env)" &&) \
	CTRAIN_PIPELINE=$(PIPELINE) $(BIN)/python -m ctrain.demo

## test: the whole suite (slow end-to-end tests included)
test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

## test-fast: skip the slow end-to-end tests
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check dags plugins training_image tests bench feature_repo
	bash scripts/images.sh lint

## images: the training image and its podman copy (scripts/images.sh: its own dockerd when none answers,
##         a Debian-archive base when no registry does); IMAGES="trainer airflow" picks others.
##         images-stop stops the dockerd it started.
IMAGES ?=
images:
	bash scripts/images.sh $(IMAGES)

images-stop:
	bash scripts/images.sh stop

## up/down: Airflow (api-server, scheduler, dag-processor, triggerer) + MLflow UI on 127.0.0.1, login on.
##          PROFILE=prod: the production profile (scripts/prod.sh): Airflow and MLflow (basic auth) on
##          Postgres, Feast on Postgres + Redis, S3 (moto) on loopback, training in the container.
##          Plain `make down` stops whichever profile runs.
PROFILE ?=
up: install
ifeq ($(PROFILE),prod)
	@eval "$$(bash scripts/images.sh env)" && bash scripts/prod.sh up
else
	@bash scripts/up.sh
endif

down:
ifeq ($(PROFILE),prod)
	@bash scripts/prod.sh down
else ifeq ($(PROFILE),)
	@bash scripts/down.sh
	@bash scripts/prod.sh down
else
	@bash scripts/down.sh
endif

## bench: benchmarks (bench extra: PyTorch Lightning for the loop comparison)
bench: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-bench.lock
	$(BIN)/python bench/loop_overhead.py
	$(BIN)/python bench/checkpoint.py
	$(BIN)/python bench/data_plane.py

clean: down
	rm -rf .ctrain
