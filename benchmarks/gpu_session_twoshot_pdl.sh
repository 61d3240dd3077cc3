#!/usr/bin/env bash
# NVRAR's two-shot lamport kernel under each ARTUNE_NVRAR_TWOSHOT_PDL mode (off, the default;
# wait; on), timed the way a decode step runs it: Llama-3.1-8B's down-projection GEMM before
# every all-reduce and SGLang's fused add + RMSNorm after it (`allreduce.py --context-gemm
# --context-norm 4096`), against SGLang's own all-reduce in the same run; first, the 2-rank (or
# 4-rank) NVRAR sweep with the wait mode (every plan eagerly, the two-shot lamport among them,
# against the fp32 reference; its graph shapes take other plans on 2 ranks), since no GPU ran
# that mode before the 30th session. (gpu_session_context.sh is the older relative: the GEMM
# context alone, with and without it, and NVRAR's CTA counts; this one adds the norm after the
# all-reduce and loops over the two-shot's PDL modes.)
#
#   device run, carry [".devwhl"], kind nvidia-h200-x2 or -x4:  bash benchmarks/gpu_session_twoshot_pdl.sh
#   SIZES (default 8K,32K,128K,512K,1M,2M: NVRAR's default plan takes the two-shot lamport at
#   256K-2M on 4 ranks; on 2 ranks it did at 512K-1M until the 31st session, and now takes the
#   one-shot there, so on 2 GPUs the modes compare the same kernels and only the sweep's graph
#   check, which asks for the two-shot lamport, still runs it); MODES (default off,wait,on);
#   NO_SWEEP=1 leaves out the sweep.
set -uo pipefail
W=/tmp/artune-gpu-twoshot-pdl
source benchmarks/gpu_lib.sh
mkdir -p "$W/res"
N=$(nvidia-smi -L | wc -l)
SIZES=${SIZES:-8K,32K,128K,512K,1M,2M}
GEMM="$(( 14336 / N )),4096"  # Llama-3.1-8B's down-projection at TP=N: [M, 14336/N] x [., 4096]
if [ -z "${NO_SWEEP:-}" ]; then
    ARTUNE_NVRAR_TWOSHOT_PDL=wait step sweep_wait 200 python3 -m pytest -q -rs \
        tests/gpu/test_nvrar_gpu.py -k "sweep_${N}_ranks and not without_pdl"
    grep -h "passed\|failed\|error" "$W/sweep_wait.log" | tail -3
fi
for m in $(echo "${MODES:-off,wait,on}" | tr ',' ' '); do
    ARTUNE_NVRAR_TWOSHOT_PDL=$m step "context_$m" 150 torchrun --nproc-per-node "$N" \
        benchmarks/allreduce.py --backends sglang,nvrar --sizes "$SIZES" --context-gemm "$GEMM" \
        --context-norm 4096 --out "$W/res/context_$m.md"
done
cp "$W"/res/*.md "$OUT"/ 2>/dev/null
cat "$W/card.txt" "$W/steps.txt"
for m in $(echo "${MODES:-off,wait,on}" | tr ',' ' '); do
    echo "== ARTUNE_NVRAR_TWOSHOT_PDL=$m"
    grep '^|' "$W/res/context_$m.md" 2>/dev/null || tail -n 15 "$W/context_$m.log"
done
