#!/usr/bin/env bash
# Creates (or reuses) .venv in the project root and installs the pinned requirements plus the
# project itself in editable mode. Re-installs only when requirements.txt or pyproject.toml change.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "[bootstrap] creating virtual environment in .venv" >&2
    "$python" -m venv .venv
fi
stamp=.venv/.condorbrain-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[bootstrap] installing pinned requirements (first run takes about a minute)" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2>&1 \
        | grep -v "^WARNING: Location" >&2 || true
    .venv/bin/python -c "import numpy, pandas, arch, numba, exchange_calendars, pydantic, yaml, core" \
        || { echo "[bootstrap] installation failed" >&2; exit 1; }
    echo "$want" > "$stamp"
fi
