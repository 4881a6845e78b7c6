# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Pinned so pip takes the CPU wheel; pyproject keeps an open range for users elsewhere.
TORCH   ?= torch==2.13.0

.PHONY: demo test bench bench-train bench-clamps bench-generators bench-ensemble bench-soak bench-t4 bench-speed bench-eval bench-compile gpu-check gpu-check-ensembles install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[dev,ray,track,llc,tl]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/optolab run protocols/quickstart.yaml --out results/quickstart --overwrite

# The suite, then its numerically sensitive tests again under other CPU kernel choices
# (OpenBLAS SkylakeX / Haswell, torch avx2): a tolerance must hold on every CPU, not this one.
# One pytest worker per core (pytest-xdist; every test trains on one thread), a test file's tests
# on one worker so its module fixtures (trained runs) are built once.
XDIST   ?= -n auto --dist loadfile
test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) tests
	$(BIN)/python tests/kernel_choices.py $(XDIST)

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
	$(BIN)/python benchmarks/counter_stream.py

bench-soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py

# The T4 sweep end to end (two workers, compiled, packed, an empty compiler cache): takes the
# minutes it measures.
bench-t4: $(STAMP)
	$(BIN)/python benchmarks/t4_sweep.py --cold

# optolab's paths against JAX's, side by side (JAX in its own environment: see the script).
bench-speed: $(STAMP)
	test -x /tmp/jaxenv/bin/python || (python3 -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install --quiet jax numpy)
	$(BIN)/python benchmarks/speed_table.py

# What one evaluation costs, torch's product (MKL) against oneDNN's, side by side.
bench-eval: $(STAMP)
	$(BIN)/python benchmarks/eval_cost.py

# What a cold compile costs and where compile: auto draws the line.
bench-compile: $(STAMP)
	$(BIN)/python benchmarks/compile_cost.py

# On a machine with a CUDA GPU: the GPU check (about 7 minutes; docs/speed.md#devices).
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out results/gpu_check

# the ensembles stage alone, with the whole budget: S = 1 ... 4096, eager / captured / compiled, fp32 and tf32
gpu-check-ensembles: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out results/gpu_check_ensembles --stages ensembles --budget 420 \
		--ensemble-share 1 --ensemble-precisions fp32 tf32

clean:
	rm -rf $(VENV) build *.egg-info
