#!/usr/bin/env bash
# NVRAR's lamport one-shot, per-thread gather (ARTUNE_NVRAR_LAMPORT_FLAT=1, the default) against
# the tile gather (=0), beside SGLang's custom all-reduce and NCCL in the same runs: 4 GPUs, then
# 2; then the 4-rank GPU sweep with the new default.
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session_lamport.sh
#   SIZES=...: the 4-GPU sizes; TEST_K=EXPR: the pytest selection (default: sweep_4_ranks);
#   FLATS="1": the per-thread gather only.
set -uo pipefail
W=/tmp/artune-gpu-lamport
source benchmarks/gpu_lib.sh
mkdir -p "$W/res"
SIZES=${SIZES:-4K,16K,64K,128K,256K,384K}
LP="nvrar:algo=oneshot,proto=lamport,ctas=128,block"
V="--variant ${LP}=256 --variant ${LP}=512 --variant ${LP}=1024 --variant ${LP}=512,warps=2"
for flat in ${FLATS:-1 0}; do
    export ARTUNE_NVRAR_LAMPORT_FLAT=$flat
    step "lamport_flat${flat}_4gpu" 120 torchrun --nproc-per-node 4 benchmarks/allreduce.py \
        --backends nccl,sglang,nvrar $V --sizes "$SIZES" --out "$W/res/lamport_flat${flat}_4gpu.md"
done
unset ARTUNE_NVRAR_LAMPORT_FLAT
export CUDA_VISIBLE_DEVICES=0,1
step lamport_flat1_2gpu 90 torchrun --nproc-per-node 2 benchmarks/allreduce.py \
    --backends nccl,sglang,nvrar $V --sizes 4K,16K,64K,256K --out "$W/res/lamport_flat1_2gpu.md"
unset CUDA_VISIBLE_DEVICES
step gputest 200 python3 -m pytest -q -s tests/gpu/test_nvrar_gpu.py -k "${TEST_K:-sweep_4_ranks}"
cat "$W/card.txt" "$W/steps.txt"
for f in lamport_flat1_4gpu lamport_flat0_4gpu lamport_flat1_2gpu; do
    echo "== $f"; grep '^|\|WRONG\|not run\|wrote' "$W/res/$f.md" 2>/dev/null || tail -n 15 "$W/$f.log"
done
tail -n 5 "$W/gputest.log"
