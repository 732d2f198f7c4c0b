#!/usr/bin/env bash
# Idempotent and cheap: Python `tokenizers` (the release that the Rust crate pins, one ~3 MB
# wheel, no torch) in the bench venv .venv-bench/, for the parity test of subword runs
# (tests/tests/tokenizer.rs) and bench/tokenizer_bench.py. `make test` runs it; when pip
# cannot install it (offline), it says so and exits 0: the parity test then prints a skip line.
set -uo pipefail

TOKENIZERS_VERSION=0.22.2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
PYTHON="${PYTHON:-python3}"

if "$VENV/bin/python" -c "import tokenizers, sys; sys.exit(tokenizers.__version__ != '$TOKENIZERS_VERSION')" \
    >/dev/null 2>&1; then
  echo "tokenizers_env: tokenizers $TOKENIZERS_VERSION ready in $VENV"
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]] && ! "$PYTHON" -m venv "$VENV"; then
  echo "tokenizers_env: cannot create $VENV; the Python parity test will be skipped" >&2
  exit 0
fi
if ! "$VENV/bin/python" -m pip --disable-pip-version-check install --quiet "tokenizers==$TOKENIZERS_VERSION"; then
  echo "tokenizers_env: pip could not install tokenizers==$TOKENIZERS_VERSION; the parity test will be skipped" >&2
  exit 0
fi
echo "tokenizers_env: tokenizers $TOKENIZERS_VERSION installed in $VENV"
