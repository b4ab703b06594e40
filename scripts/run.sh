#!/usr/bin/env bash
# The README's run command: set up .venv if needed, then run core/main.py with the given arguments.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec .venv/bin/python core/main.py "$@"
