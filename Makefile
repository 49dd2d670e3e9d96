# The two commands of the README. Both create .venv and install pinned dependencies when needed.
.PHONY: demo test setup bench clean

ARGS ?=

demo: setup
	.venv/bin/python -m simulations.demo $(ARGS)

test: setup
	.venv/bin/python -m pytest -q

setup:
	@bash scripts/setup.sh

bench: setup
	.venv/bin/python -m simulations.bench_dp_step
	.venv/bin/python -m simulations.bench_fedsvd
	.venv/bin/python -m simulations.bench_aggregation

clean:
	rm -rf runs .pytest_cache
