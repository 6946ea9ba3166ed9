#!/usr/bin/env bash
# The slow part of the fault and kill tests (docs/reliability.md), in one command: every
# fault of loadtests/faults.py with its figures (~8 min), the PostgreSQL restart at the
# documented rate, the kill -9 tests under a real Locust run, and the two lunch-peak runs
# with a worker and then the whole service killed (~1 min each). CI runs the fast part
# (tests/test_faults.py, tests/test_locust_kill.py at a lower rate). Each step runs on
# private servers and under the benchmarks' lock, so it waits for a benchmark running
# beside it rather than sharing the machine with it. Stops at the first step that fails.
# About 15 minutes in all on a 2-core machine (2026-12-07: every step ok, money lost 0).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh
step() { echo "== slow part: $*" >&2; flock /tmp/eum-bench.lock "$@"; }
step .venv/bin/python loadtests/faults.py
step .venv/bin/python loadtests/faults.py pg-restart --rate 200 --during 20
step .venv/bin/python -m pytest -q -p no:xdist tests/test_locust_kill.py
step .venv/bin/python loadtests/run.py lunch-peak --users 20 --rate 300 --duration 40 --kill worker
step .venv/bin/python loadtests/run.py lunch-peak --users 20 --rate 300 --duration 40 --kill service
echo "slow part: all steps passed" >&2
