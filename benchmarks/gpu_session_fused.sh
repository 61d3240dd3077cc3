#!/usr/bin/env bash
# NVRAR's all-reduce fused with the residual add and RMSNorm (NvrarComm.fused_add_rmsnorm) on
# every GPU of the machine (2 or 4): its GPU test (eager, and in a CUDA graph between plain
# lamport calls), then benchmarks/fused_norm.py against SGLang's all-reduce + SGLang's fused add
# + RMSNorm, alone and after the decode step's GEMM (Llama-3.1-8B's down-projection at TP=N).
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4 or -x2:  bash benchmarks/gpu_session_fused.sh
# Twentieth session, 4x H100: 167 s on a fresh machine (gpu_session_2026-11-27h.md). SWEEP=1
# adds the slice sweep after the GEMM (fused_blocks_context.md, about 65 s).
set -uo pipefail
W=/tmp/artune-gpu-fused
source benchmarks/gpu_lib.sh

N=$(nvidia-smi -L | wc -l)
step fused_test 240 python3 -m pytest -q -s -rs tests/gpu/test_nvrar_gpu.py -k fused
step fused_norm 150 torchrun --nproc-per-node "$N" benchmarks/fused_norm.py \
    --out "$W/fused_norm.md"
step fused_norm_context 150 torchrun --nproc-per-node "$N" benchmarks/fused_norm.py \
    --context-gemm "$(( 14336 / N )),4096" --out "$W/fused_norm_context.md"
if [ "${SWEEP:-0}" = 1 ]; then
    step fused_blocks_context 280 torchrun --nproc-per-node "$N" benchmarks/fused_norm.py \
        --rows 1,2,4,8,16,32,64 --blocks 512,1024,2048,4096 \
        --context-gemm "$(( 14336 / N )),4096" --out "$W/fused_blocks_context.md"
fi
cat "$W/card.txt" "$W/steps.txt"
grep -h "passed\|failed\|error" "$W/fused_test.log" | tail -3
for f in fused_norm fused_norm_context $([ "${SWEEP:-0}" = 1 ] && echo fused_blocks_context); do
    echo "== $f"; grep -v "^$" "$W/$f.md" 2>/dev/null || tail -n 25 "$W/$f.log"
done
