#!/usr/bin/env bash
# Set up and run the whole test suite: the README's test command and what CI runs.
# Lint (ruff) and types (mypy) come first; the docs build runs inside pytest (tests/test_docs.py).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/services.sh
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy
.venv/bin/mypy docs/hooks.py
echo "== pytest"
# Keep TensorFlow quiet and on the CPU cores we have.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/python -m pytest "$@"
