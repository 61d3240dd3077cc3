#!/usr/bin/env bash
# NVRAR's 16-byte lamport kernels (ARTUNE_NVRAR_WIDE, artune/kernels/nvrar_wide.py) on the GPU:
# first the GPU tests that run them (beside the 8-byte kernels on every other rank, eagerly, in
# a graph and in a skewed graph; the timeout of a skipped call), then every lamport plan at
# SIZES timed with the 8-byte and the 16-byte kernels one after the other
# (`nvrar_dev.py --lamport --wide both`), then, unless NO_TABLE=1, `allreduce.py` (NCCL,
# SGLang's own, NVRAR's defaults) with ARTUNE_NVRAR_WIDE=0 and =1.
#
#   device run, carry [".devwhl"], kind nvidia-h200-x2 or -x4:  bash benchmarks/gpu_session_wide.sh
#   SIZES (default 32K,64K,128K,192K,256K,384K,512K,1M), TABLE_SIZES (default
#   4K,16K,64K,128K,256K,512K,1M,2M), NO_TESTS=1, NO_DEV=1, NO_TABLE=1.
set -uo pipefail
W=/tmp/artune-gpu-wide
source benchmarks/gpu_lib.sh
mkdir -p "$W/res"
N=$(nvidia-smi -L | wc -l)
SLUG=$(card_slug)
DAY=$(date -u +%F)
if [ -z "${NO_TESTS:-}" ]; then
    step tests_wide 240 python3 -m pytest -q -rs tests/gpu/test_nvrar_gpu.py -k wide
    grep -h "passed\|failed\|error" "$W/tests_wide.log" | tail -3
fi
if [ -z "${NO_DEV:-}" ]; then
    step dev_wide 240 torchrun --nproc-per-node "$N" benchmarks/nvrar_dev.py --lamport \
        --wide both --sizes "${SIZES:-32K,64K,128K,192K,256K,384K,512K,1M}" \
        --out "$W/res/nvrar_dev_${N}gpu_wide_${SLUG}_${DAY}.json"
fi
if [ -z "${NO_TABLE:-}" ]; then
    for w in 0 1; do
        ARTUNE_NVRAR_WIDE=$w step "table_wide$w" 150 torchrun --nproc-per-node "$N" \
            benchmarks/allreduce.py --backends nccl,sglang,nvrar \
            --sizes "${TABLE_SIZES:-4K,16K,64K,128K,256K,512K,1M,2M}" \
            --out "$W/res/allreduce_${N}gpu_wide${w}_${SLUG}_${DAY}.md"
    done
fi
cp "$W"/res/* "$OUT"/ 2>/dev/null
cat "$W/card.txt" "$W/steps.txt"
[ -z "${NO_DEV:-}" ] && sed -n '/16-byte lamport kernels/,$p' "$W/dev_wide.log"
for w in 0 1; do
    echo "== ARTUNE_NVRAR_WIDE=$w"
    grep '^|' "$W/res/allreduce_${N}gpu_wide${w}_${SLUG}_${DAY}.md" 2>/dev/null | cut -c1-80
done
exit 0
