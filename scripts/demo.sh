#!/usr/bin/env bash
# The demo: installs what it needs (.venv, packages, servers), then runs the whole mesh fed by
# the simulator and prints a summary. Flags go to scripts/demo.py (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python scripts/demo.py "$@"
