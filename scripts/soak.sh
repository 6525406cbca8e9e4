#!/usr/bin/env bash
# A week in one command: installs what it needs (.venv, packages, servers), then replays five
# trading days through the whole mesh with faults on a schedule and reconciles each day.
# Flags go to `python -m devstack.soak` (--help lists them); exits 1 when a day falls short.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m devstack.soak "$@"
