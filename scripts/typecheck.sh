#!/usr/bin/env bash
# Type-check the package with mypy: `scripts/typecheck.sh` (after scripts/setup.sh).
# The repository root is the package `shardps`, so mypy reads it through a `shardps` link in a
# temporary folder (it cannot follow setuptools' editable-install finder). Settings: pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
ln -s "$(pwd)" "$root/shardps"
cd "$root"
"$OLDPWD/.venv/bin/python" -m mypy --config-file "$OLDPWD/pyproject.toml" --cache-dir "$OLDPWD/.mypy_cache" -p shardps
