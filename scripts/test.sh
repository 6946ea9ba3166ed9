#!/usr/bin/env bash
# Runs the whole test suite from a fresh clone: makes .venv, installs the project,
# makes sure PostgreSQL and Redis answer (starting the local ones if they are down),
# then runs pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/prepare.sh
exec .venv/bin/python -m pytest -q -n 2 "$@"
