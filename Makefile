.PHONY: setup serve test test-fast test-nightly lint bench

setup:
	bash scripts/setup.sh

serve: setup
	.venv/bin/quantserve serve --host 127.0.0.1 --port 8000

test: setup
	bash scripts/test.sh

test-fast: setup
	.venv/bin/python -m pytest -m "not slow and not nightly" -q

test-nightly: setup
	.venv/bin/python -m pytest -m nightly -q

lint: setup
	.venv/bin/ruff check .
