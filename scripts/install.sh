#!/usr/bin/env bash
# Create .venv (once) and install pjd with the pinned CPU torch of constraints.txt, the C++ op and
# the test extra. Re-runs the editable install when setup.py, pyproject.toml or csrc/ change.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.installed"
if [ -f "$stamp" ] && [ -z "$(find setup.py pyproject.toml constraints.txt csrc -newer "$stamp" 2>/dev/null)" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q -c constraints.txt torch==2.13.0 setuptools wheel ninja numpy
"$VENV/bin/python" -m pip install -q -c constraints.txt --no-build-isolation -e ".[test]"
touch "$stamp"
