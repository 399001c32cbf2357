#!/usr/bin/env bash
# The fast loop: every test that starts no cluster of processes and no Docker engine
# (markers `slow` and `compose` left out), then ruff; about 35 s on an idle 2-core machine.
#   scripts/fast-test.sh [pytest args]     # e.g. scripts/fast-test.sh tests/proto -x
# Uses .venv when there is one (scripts/setup.sh makes it), else $PYTHON or python.
# The full suite is scripts/test.sh (what CI runs); docs/development.md says more.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python}; fi
"$PY" scripts/gen_docs.py --check
"$PY" -m pytest -q -p no:cacheprovider -m "not slow and not compose" "$@"
"$PY" -m ruff check .
