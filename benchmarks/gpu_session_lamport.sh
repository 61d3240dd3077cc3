#!/usr/bin/env bash
# NVRAR's lamport plans (one-shot, and two-shot on one node) as columns beside its defaults,
# SGLang's custom all-reduce and NCCL in the same run: 4 GPUs, then 2; then the GPU tests.
# (The seventh session's runs of this script also compared the one-shot's earlier tile gather,
# since removed: benchmarks/results/allreduce_lamport_tile_4gpu_h100.md.)
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session_lamport.sh
#   SIZES=...: the 4-GPU sizes; TEST_K=EXPR: the pytest selection (default: sweep_4_ranks).
set -uo pipefail
W=/tmp/artune-gpu-lamport
source benchmarks/gpu_lib.sh
mkdir -p "$W/res"
SIZES=${SIZES:-4K,16K,64K,128K,256K,512K,1M,2M}
ONE="nvrar:algo=oneshot,proto=lamport,ctas=128,block"
TWO="nvrar:algo=twoshot,proto=lamport,ctas=128,block"
V="--variant ${ONE}=256 --variant ${ONE}=512 --variant ${TWO}=512 --variant ${TWO}=1024"
V="$V --variant ${TWO}=2048"
step lamport_4gpu 150 torchrun --nproc-per-node 4 benchmarks/allreduce.py \
    --backends nccl,sglang,nvrar $V --sizes "$SIZES" --out "$W/res/lamport_4gpu.md"
export CUDA_VISIBLE_DEVICES=0,1
step lamport_2gpu 120 torchrun --nproc-per-node 2 benchmarks/allreduce.py \
    --backends nccl,sglang,nvrar $V --sizes 4K,16K,64K,256K,1M --out "$W/res/lamport_2gpu.md"
unset CUDA_VISIBLE_DEVICES
step gputest 300 python3 -m pytest -q -s tests/gpu/test_nvrar_gpu.py -k "${TEST_K:-sweep_4_ranks}"
cat "$W/card.txt" "$W/steps.txt"
for f in lamport_4gpu lamport_2gpu; do
    echo "== $f"; grep '^|\|WRONG\|not run\|wrote' "$W/res/$f.md" 2>/dev/null || tail -n 15 "$W/$f.log"
done
tail -n 5 "$W/gputest.log"
