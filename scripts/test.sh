#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and runs everything CI checks: lint, the
# deployment validators, and the test suite (fast tests first, then the slow
# ones that load SmolLM2 and start real servers). Nightly tests are excluded;
# `make test-nightly` runs them. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== deployment validators"
bash scripts/validate_deploy.sh
# pytest exits 5 when it collected no test: that counts as a failure here too.
echo "== fast tests"
.venv/bin/python -m pytest -m "not slow and not nightly" -q "$@"
echo "== slow tests (SmolLM2, real servers)"
.venv/bin/python -m pytest -m "slow and not nightly" -q "$@"
