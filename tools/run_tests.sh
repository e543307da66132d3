#!/usr/bin/env bash
# The whole test suite: lint, then pytest. `make test` and .ci/run call this.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -m ruff check leffa_jax tests tools benchmarks || exit 1
$PY -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
rc=$?
# pytest exits 5 when nothing was collected: that is a failure for us, not a pass.
exit $rc
