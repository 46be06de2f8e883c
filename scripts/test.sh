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
# core (PYACCEL_TEST_WORKERS overrides: a count, or 0 for none), with the
# late-team guard off there (busy workers would make it run the 2-thread
# calls on one thread and leave their split untested), then the `serial`
# ones (they need idle cores, or test the guard) alone, guard on.
# Arguments go to both parts; with a -m of your own, one plain run instead.
for arg in "$@"; do
  case "$arg" in
    -m | -m*) exec pytest -q -p no:cacheprovider tests "$@" ;;
  esac
done
workers=${PYACCEL_TEST_WORKERS:-auto}
rc1=0
PYACCEL_LATE_TEAM_GUARD=0 pytest -q -p no:cacheprovider -n "$workers" -m "not serial" tests "$@" || rc1=$?
rc2=0
pytest -q -p no:cacheprovider -m serial tests "$@" || rc2=$?
# 5: no test selected, fine for one part as long as the other ran some
if [ "$rc1" -eq 5 ] && [ "$rc2" -eq 5 ]; then exit 5; fi
[ "$rc1" -eq 5 ] && rc1=0
[ "$rc2" -eq 5 ] && rc2=0
[ "$rc1" -ne 0 ] && exit "$rc1"
exit "$rc2"
