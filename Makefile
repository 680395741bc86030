# The two commands a new user types. Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --constraint constraints.txt

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamp files re-run the install when the package metadata or the pins change.
$(VENV)/.demo-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[examples]'
	@touch $@

$(VENV)/.test-installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[test]'
	@touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(BIN)/python examples/efficientnet_lite0/prepare.py
	$(BIN)/mpsearch run examples/efficientnet_lite0/cache/model.onnx \
		--hw hw_profiles/snapdragon_8gen3.yaml --budget bops=0.75 \
		--data examples/efficientnet_lite0/cache/calib.npz \
		--eval-data examples/efficientnet_lite0/cache/eval.npz --out out/

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q

lint: $(VENV)/.test-installed
	$(BIN)/ruff check mpsearch tests examples benchmarks

clean:
	rm -rf out build *.egg-info
