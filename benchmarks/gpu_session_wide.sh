#!/usr/bin/env bash
# The lamport one-shot with two words per thread (Plan.wpt 2, docs/nvrar.md "16-byte words") on
# every GPU of the machine: correct there, and faster than one word per thread and than SGLang's
# own custom all-reduce at 16K-128K (issue #3's last gap: 48K-64K on 4x H200)?
#
#   device run, carry [".devwhl"], kind nvidia-h200-x4:  bash benchmarks/gpu_session_wide.sh
#
# Steps (each with its own time limit, so that one call stays inside the device's 600 s):
#   tests  the skewed graph sequence (one rank held back before each call in turn; it holds a
#          wpt 2 one-shot) and the N-rank randomized sweep (its candidates hold one too);
#   bench  allreduce.py, graph, bf16: NCCL, SGLang's own, NVRAR's defaults and two wpt 2
#          variants (512-element chunks on 2 warps; 1024 on 4) side by side, every column
#          checked against the fp32 reference before it is timed; twice, so that a difference
#          of hundredths shows whether it repeats.
# Not run yet (written in the 28th session, after its device time was spent).
set -uo pipefail
W=/tmp/artune-gpu-wide
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
CARD=$(grep -q H200 "$W/card.txt" && echo h200 || echo h100)
SIZES=${SIZES:-16K,32K,48K,64K,96K,128K}
export ARTUNE_TIMEOUT_S=${ARTUNE_TIMEOUT_S:-20}  # a race would otherwise hold each replay 60 s
step tests 300 python3 -m pytest -q -s -rs tests/gpu/test_nvrar_gpu.py \
    -k "skewed or sweep_${N}_ranks and not without_pdl"
grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
for run in 1 2; do
    step "bench$run" 100 torchrun --nproc-per-node "$N" benchmarks/allreduce.py \
        --backends nccl,sglang,nvrar --sizes "$SIZES" --reps 25 \
        --variant nvrar:wpt=2 --variant nvrar:block=1024,wpt=2 \
        --out "$W/allreduce_wide_${N}gpu_${CARD}_run$run.md"
done
cat "$W/card.txt" "$W/steps.txt"
for run in 1 2; do
    grep "^|" "$W/allreduce_wide_${N}gpu_${CARD}_run$run.md" 2>/dev/null || tail -20 "$W/bench$run.log"
done
