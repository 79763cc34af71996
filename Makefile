# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# uv comes from PyPI when it is missing (`python3 -m uv` works right after `pip install uv`).
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)
RUN := $(UV) run --locked --no-progress

.PHONY: setup demo test bench lint format

setup:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --locked --no-progress

demo: setup
	$(RUN) wsss synth
	$(RUN) wsss run-local

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
