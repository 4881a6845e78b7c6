# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Pinned so pip takes the CPU wheel; pyproject keeps an open range for users elsewhere.
TORCH   ?= torch==2.13.0

.PHONY: demo test bench bench-train bench-clamps bench-generators bench-ensemble bench-soak bench-t4 install clean

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

# Everything but the soak (1e5 steps, ~10 min on its own): a few minutes on one core.
bench: bench-train bench-clamps bench-ensemble bench-generators

bench-train: $(STAMP)
	$(BIN)/python benchmarks/train_speed.py

bench-ensemble: $(STAMP)
	$(BIN)/python benchmarks/ensemble.py --sizes 1 8
	$(BIN)/python benchmarks/ensemble.py --compile --steps 800 --sizes 1 4 8 16 --protocols none layer1
	$(BIN)/python benchmarks/ensemble.py --compile --steps 1000 --sizes 8 --protocols none --parallel 2

bench-clamps: $(STAMP)
	$(BIN)/python benchmarks/clamp_overhead.py

bench-generators: $(STAMP)
	$(BIN)/python benchmarks/generators.py

bench-soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

# The T4 sweep end to end (two workers, compiled, packed): takes the minutes it measures.
bench-t4: $(STAMP)
	$(BIN)/python benchmarks/t4_sweep.py

clean:
	rm -rf $(VENV) build *.egg-info
