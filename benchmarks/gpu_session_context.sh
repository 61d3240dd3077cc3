#!/usr/bin/env bash
# Two questions on NPROC GPUs (default 4), after (or without) gpu_session_cold.sh on the same machine:
# 1. Does an all-reduce cost more between GEMMs than back to back, and does NVRAR's CTA count
#    matter there? (`allreduce.py --context-gemm`, Llama-3.1-8B's down-projection at TP=NPROC,
#    against the same sizes without the GEMMs, NVRAR at its defaults and at 8/16/32 CTAs.)
# 2. Are host-bound eager calls slower once a process holds what a tune's rank holds (NVSHMEM,
#    SGLang)? (`router_eager.py` with and without `--also nvrar,nvshmem_reduce,sglang`.)
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session_context.sh
#   NO_EAGER=1 leaves out question 2; PDL_OFF=1 adds the GEMM run with ARTUNE_NVRAR_PDL=0 (does
#   NVRAR's programmatic dependent launch change its cost after a GEMM?). NPROC=2 for 2 GPUs;
#   VARIANTS="" times NVRAR at its defaults only.
set -uo pipefail
W=/tmp/artune-gpu-context
source benchmarks/gpu_lib.sh
mkdir -p "$W/res"
SIZES=${SIZES:-8K,32K,128K,512K}
N=${NPROC:-4}
GEMM="$(( 14336 / N )),4096"  # Llama-3.1-8B's down-projection at TP=N: [M, 14336/N] x [., 4096]
V=${VARIANTS-"--variant nvrar:ctas=8 --variant nvrar:ctas=16 --variant nvrar:ctas=32"}
step allreduce_context 150 torchrun --nproc-per-node "$N" benchmarks/allreduce.py --backends nccl,sglang,nvrar \
    $V --sizes "$SIZES" --context-gemm "$GEMM" --out "$W/res/allreduce_context.md"
step allreduce_nocontext 120 torchrun --nproc-per-node "$N" benchmarks/allreduce.py --backends nccl,sglang,nvrar \
    $V --sizes "$SIZES" --out "$W/res/allreduce_nocontext.md"
[ -n "${PDL_OFF:-}" ] && ARTUNE_NVRAR_PDL=0 step allreduce_context_pdl_off 150 torchrun \
    --nproc-per-node "$N" benchmarks/allreduce.py --backends nccl,sglang,nvrar $V --sizes "$SIZES" \
    --context-gemm "$GEMM" --out "$W/res/allreduce_context_pdl_off.md"
[ -z "${NO_EAGER:-}" ] && step router_eager_plain 60 torchrun --nproc-per-node "$N" benchmarks/router_eager.py --sizes 4K,64K \
    --out "$W/res/router_eager_plain.md"
[ -z "${NO_EAGER:-}" ] && step router_eager_also 90 torchrun --nproc-per-node "$N" benchmarks/router_eager.py --sizes 4K,64K \
    --also nvrar,nvshmem_reduce,sglang --out "$W/res/router_eager_also.md"
cat "$W/card.txt" "$W/steps.txt"
for f in allreduce_context allreduce_nocontext allreduce_context_pdl_off router_eager_plain \
        router_eager_also; do
    echo "== $f"; grep -v '^$' "$W/res/$f.md" 2>/dev/null | tail -n 14 || tail -n 15 "$W/$f.log"
done
