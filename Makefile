# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# uv comes from PyPI when it is missing (`python3 -m uv` works right after `pip install uv`).
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUN := $(UV) run --locked --no-progress
# Ray starts its workers with the driver's interpreter (the synced .venv) rather than through
# `uv run` once more, which would only repeat the sync and warn about VIRTUAL_ENV.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0
# Installed packages get their bytecode at install time (once, ~17 s). Without it every fresh
# process compiles what it imports, and where PYTHONDONTWRITEBYTECODE is set (as on the machines
# this was built on) every Ray worker compiles torch, Ray and pandas afresh: 6 s, not 3.5 s, to
# import the labeling steps on this 2-core machine.
export UV_COMPILE_BYTECODE := 1

.PHONY: setup demo test bench lint format

setup:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --locked --no-progress

# The synthetic dataset goes to a local S3 server on 127.0.0.1, and every stage runs through Ray
# from there, as on a cluster; the server stops when the run ends, whatever its outcome.
demo: setup
	$(RUN) wsss synth --config configs/demo.yaml
	$(RUN) python -m cluster.local_s3 run --bucket wsss-demo --upload data/synthetic:synthetic \
		-- wsss run configs/demo.yaml

test: setup
	$(RUN) pytest

bench: setup
	$(RUN) python bench/random_walk.py --out bench/results/random_walk.json
	$(RUN) python bench/crf.py --iterations 5 10 --out bench/results/crf.json

lint: setup
	$(RUN) ruff check .
	$(RUN) ruff format --check .

format: setup
	$(RUN) ruff format .
	$(RUN) ruff check --fix .
