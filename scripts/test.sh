#!/usr/bin/env bash
# The README's test command: set up .venv if needed, then run the test suite (slow tests excluded;
# pass -m slow to run them). Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
