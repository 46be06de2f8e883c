#!/usr/bin/env bash
# Set everything up, then run the whole test suite against the installed wheel
# (Triton kernels in the interpreter when there is no GPU).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export PYACCEL_REQUIRE_INSTALLED=1
# the pytest script, not `python -m pytest`: -m would put the source tree first on sys.path.
# Two parts: everything but the `serial` tests on one pytest-xdist worker per
# core (PYACCEL_TEST_WORKERS overrides: a count, or 0 for none), then the
# `serial` ones (multi-thread splits that need idle cores) alone.
workers=${PYACCEL_TEST_WORKERS:-auto}
status=0
pytest -q -p no:cacheprovider -n "$workers" -m "not serial" tests "$@" || status=$?
rc=0
pytest -q -p no:cacheprovider -m serial tests "$@" || rc=$?
[ "$rc" -eq 5 ] || [ "$rc" -eq 0 ] || status=$rc  # 5: the arguments selected no serial test
exit $status
