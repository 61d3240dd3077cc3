#!/usr/bin/env bash
# The fused linear kernel's weight prefetch (prefetch=1, docs/nvrar.md), in one call on a
# 4-GPU machine (written in the twenty-fifth session, not yet run):
#   - tests/gpu/test_nvrar_gpu.py -k linear_all_reduce (half its cases now prefetch);
#   - benchmarks/linear_ar.py: Llama-3.1-8B's TP=4 o_proj and down_proj at 1 / 4 / 16 rows,
#     the fused kernel at the defaults without and with the prefetch (back-to-back calls in a
#     graph: each call's predecessor is the previous one, which lets dependents launch at once,
#     so this is the most the prefetch can gain, not what a served model gains);
#   - the served pair ORDER (default artune,artune_prefetch: the reference profile as it is,
#     and a copy whose fused ranges prefetch) REPS rounds at BATCH_SIZES on the decode graphs'
#     GPU time, with PROFILE_BS (default 1): each engine's replay split into busy, idle and
#     overlapping time (kernel_table.py).
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4:  bash benchmarks/gpu_session_prefetch.sh
#   compiled:  GEMM=aten INDUCTOR=det ORDER=artune_compile,artune_compile_prefetch TIMEOUT_S=420
set -uo pipefail
W=/tmp/artune-gpu-prefetch
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
PROF=$(reference_profile) || { echo "no profile of this card and GPU count: stopping"; exit 3; }
if [ "${TESTS:-1}" = 1 ]; then
    step tests 150 python3 -m pytest -q -rs tests/gpu/test_nvrar_gpu.py -k linear_all_reduce
    grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
fi
if [ "${MICRO:-1}" = 1 ]; then
    step micro 120 python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
        benchmarks/linear_ar.py --shapes 1024x4096,3584x4096 --rows 1,4,16 \
        --variants 32x256,32x256p --out "$OUT/linear_ar_prefetch_${N}gpu.md"
    cat "$OUT/linear_ar_prefetch_${N}gpu.md" 2>/dev/null | head -30 || tail -20 "$W/micro.log"
fi
cat "$W/steps.txt" 2>/dev/null
case "${GEMM:-}" in aten) export TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN ;; esac
case "${INDUCTOR:-}" in det) export TORCHINDUCTOR_DETERMINISTIC=1 ;; esac
PAIRED=${ORDER:-artune,artune_prefetch} REPS=${REPS:-12} BATCH_SIZES=${BATCH_SIZES:-1,4,16} \
    PROFILE_BS=${PROFILE_BS:-1} BUDGET_S=$(( ${LIMIT_S:-580} - ($(date +%s) - T0) )) \
    bash benchmarks/gpu_session_sglang.sh "$PROF" "$N"
