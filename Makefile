# Two commands do everything on a fresh machine:
#   make demo   the whole split on the embedded tiny model pair
#   make test   lint, type-check and the test suite (what .ci/run runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-install when the project's dependencies change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PROTO_FILES := $(wildcard protos/speckv/v1/*.proto)

.PHONY: venv test lint typecheck pytest demo loop selector protos protos-check buf-lint buf-breaking clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The CPU build of torch lies on these machines; installing it first keeps
	@# the looser `torch>=` requirement from pulling a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy predictor_service decode_worker client benchmarks/speckv_eval benchmarks/speckv_tinypair benchmarks/*.py

pytest: venv
	$(VENV)/bin/pytest -ra --durations=15 $(PYTEST_ARGS)

test: lint typecheck pytest

demo: venv
	$(PY) benchmarks/demo.py

# The A/B loop on the demo pair: record steps → train v2 on them → 20 % canary → `speckv ab`
# verdict → promote or roll back (README, "The A/B loop"). LOOP_ARGS="--canary max-gamma"
# canaries an always-largest-γ model instead (slower on the demo pair: rolled back).
loop: venv
	$(PY) benchmarks/loop.py $(LOOP_ARGS)

# Train the in-step selector (speckv-instep) on the demo pair's training prompts and
# register it in .cache/selector/repo (README, "The learned selector").
selector: venv
	$(PY) benchmarks/selector.py

# Regenerate the committed stubs; tests/test_protos.py fails when they drift.
protos: venv
	$(PY) -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos $(PROTO_FILES)

buf-lint:
	npx -y @bufbuild/buf lint protos

# The contract must stay backward compatible with the first release (tests/contract runs
# the same check inside `make test`).
RELEASE_REF ?= 9bec699
buf-breaking:
	rm -rf .cache/buf-release && mkdir -p .cache/buf-release
	git archive $(RELEASE_REF) protos | tar -x -C .cache/buf-release
	npx -y @bufbuild/buf breaking protos --against .cache/buf-release/protos

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
