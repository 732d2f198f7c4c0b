#!/usr/bin/env bash
# Ring all-reduce of the full-vocab embedding gradient (100,684 x 128 f32 = 51.6 MB) among
# 2 and 4 processes on 127.0.0.1, against a plain memory copy of the same buffer measured
# in the same run (by the launcher, before it starts the ranks).
#
#   bench/ring_allreduce.sh
#   WORLDS="2 3 4" ITERS=20 CHUNK_KIB=256 bench/ring_allreduce.sh
#
# Every rank checks its result bit for bit against the ring order computed locally; a
# mismatch fails the run. On 127.0.0.1 the time is CPU-bound (kernel copies, reduction), and
# with fewer cores than processes the ranks share cores: the table prints the core count,
# the load before the runs, and the CPU time a call costs over all ranks, which depends
# much less on other work on the machine than the wall time does.
set -euo pipefail
cd "$(dirname "$0")/.."

WORLDS=${WORLDS:-"2 4"}
ITERS=${ITERS:-10}
CHUNK_KIB=${CHUNK_KIB:-256}
ELEMS=${ELEMS:-12887552}

cargo build --release --quiet -p worker --bin ring_bench
# Taken before the runs: other work on the machine shows in the figures.
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
bin=./target/release/ring_bench

rows=()
for world in $WORLDS; do
    echo "== $world processes" >&2
    out=$("$bin" --world "$world" --elems "$ELEMS" --iters "$ITERS" --chunk-kib "$CHUNK_KIB")
    echo "$out" >&2
    rows+=("$(grep '^RESULT ' <<<"$out")")
done

echo
echo "ring all-reduce, $ELEMS f32, chunk $CHUNK_KIB KiB, $ITERS timed calls; $(nproc) CPU cores, load average before the runs $load_before"
printf '%-10s %10s %15s %10s %8s %14s %20s\n' processes "buffer MB" "all-reduce ms" "memcpy ms" ratio "per-rank GB/s" "CPU ms (all ranks)"
for row in "${rows[@]}"; do
    awk '{
        for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
        printf "%-10s %10s %15.1f %10.2f %7.1fx %14.2f %20.1f\n", v["world"], v["mbytes"], v["allreduce_ms"], v["memcpy_ms"], v["ratio"], v["busbw_gbs"], v["cpu_ms_all_ranks"]
    }' <<<"$row"
done
