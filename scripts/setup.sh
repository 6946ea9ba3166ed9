#!/usr/bin/env bash
# Creates .venv and installs the project with its test dependencies (idempotent).
# Python 3.11 or newer: `python3`, or the interpreter named by PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
too_old() {  # exit 0 when the interpreter $1 is older than 3.11 (or cannot run)
  ! "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}
if [ -x .venv/bin/python ] && too_old .venv/bin/python; then
  # made by an older Python (the install then failed): made again rather than kept
  echo "setup: .venv has $(.venv/bin/python -V 2>&1 || echo 'no working Python'); making it again" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  if too_old "$PYTHON"; then
    found=$(command -v "$PYTHON" >/dev/null && "$PYTHON" -V 2>&1 || echo "not found")
    echo "error: the project needs Python 3.11 or newer; '$PYTHON' is $found." \
      "Install one (e.g. apt-get install python3.11) and run again with PYTHON=python3.11" >&2
    exit 2
  fi
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
  touch "$stamp"
fi
