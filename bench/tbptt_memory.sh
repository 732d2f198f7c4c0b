#!/usr/bin/env bash
# Peak memory of one training step vs the TBPTT window K, on a long synthetic batch (every
# review SEQ_LEN tokens), on the CPU. Each K runs in a fresh process, since a process's peak
# RSS (VmHWM) only grows. Prints one JSON line per K, then a table.
#
#   bench/tbptt_memory.sh                      # the tutorial's model, 32 x 2000 tokens
#   SEQ_LEN=4000 KS="0 50 500" bench/tbptt_memory.sh
#
# Env: WORKER (binary; default target/release/worker, else target/debug/worker), SEQ_LEN,
# BATCH, KS, CONFIG (model config; default: the tutorial's), THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKER=${WORKER:-}
if [[ -z "$WORKER" ]]; then
  if [[ -x target/release/worker ]]; then WORKER=target/release/worker; else WORKER=target/debug/worker; fi
fi
[[ -x "$WORKER" ]] || { echo "no worker binary at $WORKER: run cargo build -p worker" >&2; exit 1; }
SEQ_LEN=${SEQ_LEN:-2000}
BATCH=${BATCH:-32}
KS=${KS:-"0 1000 500 200 100 50 20"}
THREADS=${THREADS:-1}
CONFIG_ARGS=()
[[ -n "${CONFIG:-}" ]] && CONFIG_ARGS=(--config "$CONFIG")

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for k in $KS; do
  "$WORKER" --threads "$THREADS" bench-memory "${CONFIG_ARGS[@]}" --bptt "$k" \
    --seq-len "$SEQ_LEN" --batch-size "$BATCH" --steps 1 | tee -a "$results"
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
r0 = rows[0]
print()
print("%d x %d tokens, embed %d, hidden %d x %d layers, vocab %d" % (
    r0["batch_size"], r0["seq_len"], r0["embed_dim"], r0["hidden"], r0["layers"], r0["vocab_size"]))
print("%6s %13s %11s %16s %8s %9s" % ("K", "peak RSS MiB", "before MiB", "step growth MiB", "step s", "tokens/s"))
for r in rows:
    k = "full" if r["bptt"] == 0 else str(r["bptt"])
    print("%6s %13.0f %11.0f %16.0f %8.2f %9.0f" % (
        k, r["peak_rss_mib"], r["rss_before_mib"], r["peak_rss_mib"] - r["rss_before_mib"],
        r["step_seconds"], r["tokens_per_second"]))
PY
