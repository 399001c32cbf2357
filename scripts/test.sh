#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: `scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/python -m ruff check .
scripts/typecheck.sh  # mypy over the package (pyproject.toml's [tool.mypy])
# The Docker end-to-end tests (docker-compose, then Swarm; marker `compose`) run last, on their own:
# they start (and stop) a Docker engine, which rewrites the root namespace's firewall.
.venv/bin/python -m pytest -p no:cacheprovider -m "not compose" "$@"
.venv/bin/python -m pytest -p no:cacheprovider -m compose "$@" || [ $? -eq 5 ]  # 5: none selected
