#!/usr/bin/env bash
# The chaos benchmark (bench/chaos.py): random workers killed at random times (and, with
# --kind, the other faults of bench/RELIABILITY.md), every job must finish bitwise equal to an
# uninterrupted run. `make chaos` and `make reliability` build and run it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/chaos.py "$@"
