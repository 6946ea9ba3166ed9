#!/usr/bin/env bash
# Runs the service on the embedded default (SQLite under var/, no Redis) with demo
# data, and prints keys to try it. Extra arguments go to `eum serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/eum serve --demo "$@"
