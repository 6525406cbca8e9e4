#!/usr/bin/env bash
# Run the test suite: bootstrap (with chromium for the dashboard's browser test), lint (ruff
# check, ruff format --check, mypy), then pytest.
# Extra arguments go to pytest; TICKMESH_SKIP_LINT=1 skips the lint step (local reruns only).
#
#   bash scripts/test.sh                      # everything except tests marked slow
#   TICKMESH_SLOW=1 bash scripts/test.sh      # slow tests too
#   bash scripts/test.sh tests/test_localstack.py -x
#
# Exits with pytest's status; "no tests collected" (pytest's 5) is a failure too.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/bootstrap.sh --browser

select_marker=()
if [[ "${TICKMESH_SLOW:-0}" != "1" ]]; then
    # A later -m given by the caller wins: pytest keeps the last one.
    select_marker=(-m "not slow")
fi

# Lint, layout and types first: cheap, and CI runs exactly this script.
if [[ "${TICKMESH_SKIP_LINT:-0}" != "1" ]]; then
    lint_paths=(libs services tests bench scripts deploy devstack)
    .venv/bin/python -m ruff check "${lint_paths[@]}"
    .venv/bin/python -m ruff format --check "${lint_paths[@]}"
    .venv/bin/python -m mypy
fi

status=0
.venv/bin/python -m pytest -q "${select_marker[@]}" "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: FAILED: pytest collected no tests (exit 5)" >&2
elif [[ $status -ne 0 ]]; then
    echo "test.sh: FAILED: pytest exited with $status" >&2
fi
exit "$status"
