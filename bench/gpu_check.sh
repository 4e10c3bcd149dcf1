#!/usr/bin/env bash
# Tensor parallelism on a GPU host (issue 8), in under 5 minutes: NCCL groups of 1 and of every
# visible GPU (and 2 when there are more), logits and greedy ids equal to k=1, tokens/s, the
# latency of one all-reduce. Nothing to install beyond `make install`; needs the CUDA torch wheel.
#
#   bench/gpu_check.sh                  # defaults: hidden 2048, 16 heads, 12 layers, vocab 65536, fp32
#   bench/gpu_check.sh --layers 24      # any option of bench/tp_gpu.py
#   bench/gpu_check.sh --cpu --hidden 128 --heads 4 --layers 2 --vocab 512 --steps 8   # dry run without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())'
exec timeout 290 "$PY" bench/tp_gpu.py "$@"
