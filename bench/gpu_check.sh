#!/usr/bin/env bash
# The GPU check (NCCL issue): one call of at most 8 minutes on one H100 or H200.
# Built on the CPU machine, run on the GPU machine against its PyTorch 2.11 install:
#
#   cargo build --release --bins && strip target/release/{worker,coordinator}
#   # on the GPU host, from the repository root, with the corpus copied into data/:
#   LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib \
#     IMDB_DATA=data/aclImdb_labelled.tar.gz bench/gpu_check.sh
#
# It prints a table of:
#   1. NCCL at world size 1 (worker bench-collective): communicator from an id, all-reduce
#      and broadcast in device memory leave the buffer exact; 51.5 MB all-reduce time;
#   2. coordinator --workers 1 --backend nccl, the seed recipe for a fixed number of steps:
#      tokens/s, and that the job really ran on NCCL (summary backend), unsorted and bucketed;
#   3. gpu-fast.toml trained to its end: wall time, time to 88% test accuracy, final accuracy;
#   4. the tutorial's PyTorch code on the same GPU for the same steps, when python3 has torch.
# Env: WORKER/COORDINATOR (target/release/...), OUT (runs/gpu-check), STEPS (300),
#      PYTHON (python3 of the PyTorch install, for section 4).
set -uo pipefail
cd "$(dirname "$0")/.."
WORKER=${WORKER:-target/release/worker}
COORDINATOR=${COORDINATOR:-target/release/coordinator}
OUT=${OUT:-runs/gpu-check}
STEPS=${STEPS:-300}
PYTHON=${PYTHON:-python3}
[[ -x "$WORKER" && -x "$COORDINATOR" ]] || { echo "build first: cargo build --release --bins" >&2; exit 1; }
[[ -n "${IMDB_DATA:-}" && -e "$IMDB_DATA" ]] || { echo "IMDB_DATA must name the corpus" >&2; exit 1; }
mkdir -p "$OUT"
export IMDB_CACHE_DIR="$OUT/cache"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
rows=()
row() { rows+=("$(printf '%-44s %s' "$1" "$2")"); }
json() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2], {}, d))" "$@" 2>/dev/null || echo "n/a"; }

# 1. NCCL end to end at world size 1, and the 51.5 MB all-reduce.
if timeout 120 "$WORKER" bench-collective --backend nccl --device cuda > "$OUT/nccl.json" 2> "$OUT/nccl.log"; then
  row "nccl version" "$(json "$OUT/nccl.json" 'nccl_version')"
  row "nccl all-reduce/broadcast exact (world 1)" "$(json "$OUT/nccl.json" 'all_reduce_exact and broadcast_exact')"
  row "nccl all-reduce 51.5 MB, median ms" "$(json "$OUT/nccl.json" 'round(all_reduce_median_ms, 3)')"
  row "device copy 51.5 MB, median ms" "$(json "$OUT/nccl.json" 'round(copy_median_ms, 3)')"
else
  row "nccl bench-collective" "FAILED: $(tail -n 1 "$OUT/nccl.log")"
fi

# 2. The seed recipe through the coordinator on NCCL, fixed steps; unsorted then bucketed.
for order in unsorted bucketed; do
  run="$OUT/seed-$order"
  rm -rf "$run"
  if timeout 240 "$COORDINATOR" --workers 1 --backend nccl --config configs/seed.toml --data "$IMDB_DATA" \
      --out "$run" --epochs 1 --max-steps-per-epoch "$STEPS" --batch-order "$order" \
      --test-subset 1000 --val-fraction 0.02 > "$run.log" 2>&1; then
    row "seed ($order), backend" "$(json "$run/summary.json" 'backend')"
    row "seed ($order), tokens/s over $STEPS steps" "$(json "$run/summary.json" 'int(tokens_per_second)')"
    row "seed ($order), vs tutorial on H200 (96,600)" "$(json "$run/summary.json" 'round(tokens_per_second / 96600, 2)')"
  else
    row "seed ($order) on nccl" "FAILED: $(grep -m1 '^error' "$run.log" || tail -n 1 "$run.log")"
  fi
done

# 3. gpu-fast.toml to its end, test accuracy after every epoch (single process: the replica).
run="$OUT/gpu-fast"
rm -rf "$run"
if timeout 300 "$WORKER" train --config configs/gpu-fast.toml --device cuda --data "$IMDB_DATA" --out "$run" \
    --eval-test-each-epoch > "$run.log" 2>&1; then
  row "gpu-fast final test accuracy" "$(json "$run/summary.json" 'round(test_accuracy, 4)')"
  row "gpu-fast training seconds (all epochs)" "$(json "$run/summary.json" 'round(train_seconds, 1)')"
  row "gpu-fast tokens/s" "$(json "$run/summary.json" 'int(tokens_per_second)')"
  hit=$(python3 - "$run/metrics.jsonl" <<'PY'
import json, sys
tests = [json.loads(l) for l in open(sys.argv[1])]
tests = [m for m in tests if m.get("type") == "eval" and m.get("split") == "test" and m.get("model") == "last"]
hit = next((m for m in tests if m["accuracy"] >= 0.88), None)
print("%.1f s (epoch %d)" % (hit["train_seconds"], hit["epoch"]) if hit else "not reached")
PY
)
  row "gpu-fast time to 88% test accuracy" "$hit"
else
  row "gpu-fast" "FAILED: $(grep -m1 '^error' "$run.log" || tail -n 1 "$run.log")"
fi

# 4. The tutorial's PyTorch code, same GPU, same steps (for the ratios of the benchmark issue).
if "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  if timeout 240 "$PYTHON" bench/reference/tutorial.py --data "$IMDB_DATA" --device cuda --max-steps "$STEPS" \
      --no-eval > "$OUT/reference.json" 2> "$OUT/reference.log"; then
    row "tutorial PyTorch (unsorted, packed), tokens/s" \
      "$(tail -n 1 "$OUT/reference.json" | python3 -c 'import json,sys; print(int(json.load(sys.stdin)["tokens_per_second"]))' 2>/dev/null || echo n/a)"
  else
    row "tutorial PyTorch" "FAILED: $(tail -n 1 "$OUT/reference.log")"
  fi
fi

echo
echo "GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
printf '%s\n' "${rows[@]}"
