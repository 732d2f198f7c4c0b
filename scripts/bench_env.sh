#!/usr/bin/env bash
# Idempotent: a virtual environment in .venv-bench/ with torch==2.11.0 for the PyTorch
# reference of the benchmarks (bench/reference/, bench/run_bench.py).
#
#   scripts/bench_env.sh                  # CPU: the torch wheel without its CUDA wheels (~0.55 GB)
#   BENCH_TORCH=full scripts/bench_env.sh # GPU hosts: torch==2.11.0 with every CUDA dependency (~4.7 GB)
#
# CPU mode: `pip install torch` pulls about 4.7 GB of CUDA wheels that a CPU run never
# calls. Here the torch wheel is installed with --no-deps, then its pure-Python
# dependencies and the CUDA runtime + CUPTI (13 MB; libtorch_cpu.so calls into them), and
# the remaining CUDA libraries that libtorch_cuda.so / libtorch_python.so list as needed are
# replaced by stand-ins that abort with the symbol's name if ever called
# (bench/harness/make_cuda_stubs.py). A check at the end trains a tiny packed LSTM and runs
# a 2-process gloo all-reduce. A second run finds the stamp and does nothing.
set -euo pipefail

TORCH_VERSION=2.11.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$ROOT/.venv-bench}"
MODE="${BENCH_TORCH:-cpu}"
PYTHON="${PYTHON:-python3}"
REQUIREMENTS="$ROOT/bench/requirements.txt"
STUBS="$ROOT/bench/harness/make_cuda_stubs.py"

case "$MODE" in
  cpu|full) ;;
  *) echo "bench_env: BENCH_TORCH must be cpu or full, got '$MODE'" >&2; exit 2 ;;
esac
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "bench_env: $PYTHON not found; install Python 3 (3.10 to 3.13) with venv and pip" >&2
  exit 1
fi

# The stamp names what was installed, so that a change of mode or of the inputs reinstalls.
inputs_hash="$(cat "$REQUIREMENTS" "$STUBS" | sha256sum | cut -c1-12)"
STAMP="$VENV/.bench-env-torch-$TORCH_VERSION-$MODE-$inputs_hash"
if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  echo "bench_env: $VENV ready (torch $TORCH_VERSION, $MODE); nothing to do"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "bench_env: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$VENV"/.bench-env-*
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if [[ "$MODE" == full ]]; then
  echo "bench_env: installing torch==$TORCH_VERSION with its CUDA dependencies (about 4.7 GB)"
  "$VENV/bin/python" "$STUBS" --remove "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "${PIP[@]}" install --quiet "torch==$TORCH_VERSION" numpy
else
  echo "bench_env: installing torch==$TORCH_VERSION without its CUDA wheels (the wheel is about 530 MB)"
  "${PIP[@]}" install --quiet --no-deps "torch==$TORCH_VERSION"
  "${PIP[@]}" install --quiet --no-warn-conflicts -r "$REQUIREMENTS"
  "$VENV/bin/python" "$STUBS" "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
fi

echo "bench_env: checking torch on CPU (packed LSTM step, 2-process gloo all-reduce)"
"$VENV/bin/python" - <<'PY'
import datetime, os, socket
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.nn.utils.rnn import pack_padded_sequence

def reduce(rank, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    t = torch.full((1000,), float(rank + 1))
    dist.all_reduce(t)
    assert t[0].item() == 3.0, t[0].item()
    dist.destroy_process_group()

if __name__ == "__main__":
    torch.manual_seed(0)
    emb, lstm = torch.nn.Embedding(50, 8), torch.nn.LSTM(8, 16, 2, batch_first=True)
    x, lengths = torch.randint(0, 50, (3, 7)), torch.tensor([7, 2, 5])
    _, (h, _) = lstm(pack_padded_sequence(emb(x), lengths, batch_first=True, enforce_sorted=False))
    h[-1].sum().backward()
    assert lstm.weight_ih_l0.grad is not None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(reduce, args=(port,), nprocs=2, start_method="fork")  # spawn needs a file
    print(f"bench_env: torch {torch.__version__} OK on CPU (cuda available: {torch.cuda.is_available()})")
PY
touch "$STAMP"
echo "bench_env: $VENV ready"
