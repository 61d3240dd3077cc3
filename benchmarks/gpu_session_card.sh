#!/usr/bin/env bash
# One 4-GPU call whose second half depends on the card that came (a call for nvidia-h200-x4
# may run on H100s):
#   - first, on any card: the GPU tests written after the last GPU call
#     (tests/gpu/test_ops_gpu.py: artune::all_reduce also under torch.compile; and
#     test_nvrar_gpu.py -k first_used: lamport kernels first used inside a CUDA-graph capture);
#   - H200 (the card of the issues' anchors): every backend side by side (allreduce.py, graph,
#     bf16, against the NVRAR targets), then the end-to-end configs that answer the
#     NCCL-only target at bs 4 and 16: default, NCCL only and artune with SGLang's custom
#     all-reduce off (a quick tune of this machine first: no 4x H200 profile is committed);
#   - otherwise: a paired default/artune run (30 rounds, bs 1, 4, 16, 64) with the reference
#     profile, default started first.
#
#   device run, carry [".devwhl"], kind nvidia-h200-x4:  bash benchmarks/gpu_session_card.sh
set -uo pipefail
W=/tmp/artune-gpu-card
source benchmarks/gpu_lib.sh
step tests 200 python3 -m pytest -q -rs tests/gpu/test_ops_gpu.py tests/gpu/test_nvrar_gpu.py \
    -k "setup_serves or first_used"
cat "$W/steps.txt"
grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
PROF=artune/profiles/6eeb601b655cf21c.json
if grep -q H200 "$W/card.txt"; then
    step bench4 80 torchrun --nproc-per-node 4 benchmarks/allreduce.py \
        --sizes 4K,16K,64K,256K,1M,2M,16M --out "$W/allreduce_4gpu_h200.md"
    cat "$W/allreduce_4gpu_h200.md"
    CONFIGS=default,nccl,artune_nccl BATCH_SIZES=4,16 \
        BUDGET_S=$(( 585 - ($(date +%s) - T0) )) bash benchmarks/gpu_session_sglang.sh "$PROF" 4
else
    PAIRED=default,artune REPS=30 BUDGET_S=$(( 585 - ($(date +%s) - T0) )) \
        bash benchmarks/gpu_session_sglang.sh "$PROF" 4
fi
