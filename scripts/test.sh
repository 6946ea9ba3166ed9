#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: makes .venv, installs the project,
# makes sure PostgreSQL and Redis answer (starting the local ones if they are down),
# then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/services.sh
export EUM_TEST_PG_URL="${EUM_TEST_PG_URL:-postgresql://postgres@127.0.0.1:5432/postgres}"
export EUM_TEST_REDIS_URL="${EUM_TEST_REDIS_URL:-redis://127.0.0.1:6379/0}"
exec .venv/bin/python -m pytest -q -n 2 "$@"
