# The two quickstart commands: `make demo` and `make test` (each sets everything up first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo demo-dpo demo-safety test lint embedded bench claims clean

# torch goes in first and only if the environment has none: a torch already there (CUDA or CPU) is kept
# (point VENV at an existing environment to reuse its build). Otherwise torch==2.13.0 is installed: the
# local CPU wheel on a CPU machine, PyPI's CUDA build on a GPU one. Nothing else may pull torch in.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/fedalign sft recipes/quickstart.yaml

demo-dpo: install
	$(VENV)/bin/fedalign dpo recipes/quickstart-dpo.yaml

# The safety suite on the latest demo-dpo run (keyword proxy; the tiny LLaVA refuses with "I would not do
# this.", a phrase GCG's keyword list lacks, so it is added and recorded as such).
demo-safety: install
	$(VENV)/bin/fedalign eval safety $$(ls -d runs/quickstart-dpo-* | tail -1) "keywords_extra=[I would not]" max_new_tokens=24

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Rebuild the embedded tiny model and bundled data in data/ (they are committed; this is how they were made).
embedded: install
	$(PY) -m fedalign.embedded --out data

# The speed and memory figures of BENCHMARKS.md; run alone on the machine. bench/gpu_step.py needs a GPU.
bench: install
	$(PY) bench/loop_vs_trl.py
	$(PY) bench/loop_vs_floor.py
	$(PY) bench/client_scale.py
	$(PY) bench/dp_overhead.py
	$(PY) bench/dp_overhead_dpo.py
	$(PY) bench/aggregation_7b.py
	$(PY) bench/dpo_loop_vs_trl.py
	$(PY) bench/accountant_utility.py
	$(PY) bench/flower_overhead.py

# The three papers' claims in miniature (about an hour on 2 cores; resumes where it stopped), then the
# noise-amplification measurement on its ε = 6 runs; tables in BENCHMARKS.md.
claims: install
	$(PY) bench/claims.py
	$(PY) bench/noise_amplification.py

clean:
	rm -rf runs .pytest_cache
