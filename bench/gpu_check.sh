#!/usr/bin/env bash
# Tensor parallelism on a GPU host, in under 5 minutes (docs/BENCHMARKS.md, "Tensor parallelism").
#
#   bench/gpu_check.sh              # from the repository root; PYTHON=... to pick the interpreter
#
# 1. an NCCL group of 1 GPU, then of every visible GPU (the largest count <= visible that divides
#    the heads), each against the unsharded model on cuda:0: KServe logits within 1e-3 (fp32, TF32
#    off), 12 greedy ids of 3 prompts identical, decode tokens/s at batch 1 and 8 (small config);
# 2. the same group on bloom-560m's architecture (random weights, written once: ~2.2 GB in
#    $MODELS_DIR), equality and tokens/s.
# The group is set up as the server does it (models.parallel.init_group: rendezvous on 127.0.0.1,
# one process per rank, cuda:rank). Results: one JSON document per run in $OUT_DIR.
#
# Exit status: 0 all equal; 1 a mismatch or a failed run; 2 no CUDA GPU (nothing was checked).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
MODELS_DIR="${MODELS_DIR:-${TMPDIR:-/tmp}/modelsrv-tp-bench}"
OUT_DIR="${OUT_DIR:-${TMPDIR:-/tmp}/modelsrv-gpu-check-$(date +%Y%m%d-%H%M%S)}"
STEP_LIMIT="${STEP_LIMIT:-70}"    # seconds per run: folders (90 s at most) + 3 runs stay under 5 minutes

if [ ! -e /proc/driver/nvidia/gpus ] && ! compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
    echo "gpu_check: FAILED: no NVIDIA GPU on this host (no /proc/driver/nvidia/gpus, no /dev/nvidia*): nothing was checked" >&2
    exit 2
fi
gpus="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
if [ "${gpus:-0}" -lt 1 ]; then
    echo "gpu_check: FAILED: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}): nothing was checked" >&2
    exit 2
fi
"$PYTHON" -c 'import torch.distributed as d, sys; sys.exit(0 if d.is_nccl_available() else 1)' || {
    echo "gpu_check: FAILED: this torch has no NCCL backend" >&2; exit 2; }
# the largest group <= the visible GPUs that divides 8 heads (small) and 16 heads (560m)
all=1
for k in 8 4 2 1; do [ "$k" -le "$gpus" ] && { all=$k; break; }; done
mkdir -p "$OUT_DIR"
echo "gpu_check: $gpus GPU(s): $("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))'); groups of 1 and $all; results in $OUT_DIR"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true

status=0
run() {  # name, then bench/tp.py arguments
    local name="$1"; shift
    if timeout "$STEP_LIMIT" "$PYTHON" bench/tp.py --device cuda --backend nccl --check --atol 1e-3 \
            --models-dir "$MODELS_DIR" --deadline "$STEP_LIMIT" "$@" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/$name.err"; then
        "$PYTHON" - "$OUT_DIR/$name.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
k = f"k{r['world']}"
rates = " ".join(f"b{s['batch']}: k1 {a['tokens_per_s']:.0f} / {k} {s['tokens_per_s']:.0f} tok/s"
                 for a, s in zip(r["k1"]["steps"], r[k]["steps"]))
print(f"gpu_check: {sys.argv[2]}: equal to k=1 ({r['check']}); {rates}")
PY
    else
        local rc=$?
        status=1
        echo "gpu_check: FAILED: $name (exit $rc; $( [ "$rc" = 124 ] && echo "over ${STEP_LIMIT}s" || tail -n 3 "$OUT_DIR/$name.err" | tr '\n' ' '))" >&2
    fi
}
for config in small 560m; do
    timeout 90 "$PYTHON" bench/tp.py --prepare --config "$config" --models-dir "$MODELS_DIR" >/dev/null || {
        echo "gpu_check: FAILED: could not write the $config model folder in $MODELS_DIR (disk? 2.2 GB for 560m)" >&2; exit 1; }
done
run small-k1 --config small --world 1 --steps 20
[ "$all" -gt 1 ] && run "small-k$all" --config small --world "$all" --steps 20
run "560m-k$all" --config 560m --world "$all" --steps 10
[ "$status" -eq 0 ] && echo "gpu_check: OK" || echo "gpu_check: FAILED (see $OUT_DIR)" >&2
exit "$status"
