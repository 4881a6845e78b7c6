# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Pinned so pip takes the CPU wheel; pyproject keeps an open range for users elsewhere.
TORCH   ?= torch==2.13.0

.PHONY: demo test bench bench-clamps bench-generators bench-soak install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/optolab run protocols/quickstart.yaml --out results/quickstart --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

bench-clamps: $(STAMP)
	$(BIN)/python benchmarks/clamp_overhead.py

bench-generators: $(STAMP)
	$(BIN)/python benchmarks/generators.py

bench-soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) build *.egg-info
