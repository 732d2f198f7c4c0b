#!/usr/bin/env bash
# The chaos benchmark (bench/chaos.py): random workers killed at random times, every job
# must finish bitwise equal to an uninterrupted run. `make chaos` builds and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/chaos.py "$@"
