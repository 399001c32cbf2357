#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: `scripts/demo.sh [shardps run options]`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/shardps run "$@"
