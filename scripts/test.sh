#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: `scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m ruff check .
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
