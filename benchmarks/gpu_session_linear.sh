#!/usr/bin/env bash
# A row-parallel linear layer and its all-reduce in one kernel (NvrarComm.linear_all_reduce) on
# every GPU of the machine: its GPU test (eager, and in a skewed CUDA graph between plain
# lamport calls), then benchmarks/linear_ar.py against cuBLAS's GEMM + SGLang's all-reduce and
# cuBLAS's GEMM + NVRAR's, at Llama-3.1-8B's row-parallel shapes for TP = the GPU count.
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4 or -x2:  bash benchmarks/gpu_session_linear.sh
# Twenty-first session, 4x H100: 106 s on a fresh machine (gpu_session_2026-11-27i.md).
set -uo pipefail
W=/tmp/artune-gpu-linear
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
CARD=$(grep -q H200 "$W/card.txt" && echo h200 || echo h100)
step linear_test 240 python3 -m pytest -q -s -rs tests/gpu/test_nvrar_gpu.py -k linear
step linear_ar 240 torchrun --nproc-per-node "$N" benchmarks/linear_ar.py \
    --shapes "$(( 4096 / N ))x4096,$(( 14336 / N ))x4096" --rows "${ROWS:-1,4,16,64}" \
    --variants "${VARIANTS:-32x256,16x256,64x128,16x512}" --out "$W/linear_ar_${N}gpu_$CARD.md"
cat "$W/card.txt" "$W/steps.txt"
grep -h "passed\|failed\|error" "$W/linear_test.log" | tail -3
cat "$W/linear_ar_${N}gpu_$CARD.md" 2>/dev/null || tail -30 "$W/linear_ar.log"
