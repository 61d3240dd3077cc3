#!/usr/bin/env bash
# The fused linear kernel's weight prefetch (prefetch=1, docs/nvrar.md) and K-loop depth on a
# 2- or 4-GPU machine (run in the 26th session: 109 s fresh on 2x H100, the micro-benchmark
# 100 s on 4x):
#   - tests/gpu/test_nvrar_gpu.py -k linear_all_reduce (half its cases now prefetch: bulk where
#     K is a multiple of 32, line by line at K 1000);
#   - benchmarks/linear_ar.py: Llama-3.1-8B's o_proj and down_proj at TP = the GPUs (4: K 1024
#     and 3584; 2: K 2048 and 7168) at 1 / 4 / 16 rows; the fused kernel 32x256 at 3 stages (a
#     variant without sS) without and with the prefetch (back-to-back calls in a graph: each
#     call's predecessor is the previous one, which lets dependents launch at once, so this is
#     the most the prefetch can gain, not what a served model gains), and the K loop pipelined
#     2, 4 and 5 stages deep.
# Then, on the same warm machine, the served pair with the replay split (kernel_table.py):
#   TESTS=0 ORDER=artune,artune_prefetch REPS=12 BATCH_SIZES=1,4,16 PROFILE_BS=1 \
#       bash benchmarks/gpu_session_pair.sh
# and compiled: add GEMM=aten INDUCTOR=det TIMEOUT_S=420 with
#   ORDER=artune_compile,artune_compile_prefetch.
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4:  bash benchmarks/gpu_session_prefetch.sh
set -uo pipefail
W=/tmp/artune-gpu-prefetch
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
if [ "${TESTS:-1}" = 1 ]; then
    step tests 240 python3 -m pytest -q -rs tests/gpu/test_nvrar_gpu.py -k linear_all_reduce
    grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
fi
step micro 240 python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
    benchmarks/linear_ar.py --shapes "$((4096 / N))x4096,$((14336 / N))x4096" --rows 1,4,16 \
    --variants 32x256,32x256p,32x256s2,32x256s4,32x256s5,32x256s5p,32x512 --out "$OUT/linear_ar_prefetch_${N}gpu.md"
head -40 "$OUT/linear_ar_prefetch_${N}gpu.md" 2>/dev/null || tail -20 "$W/micro.log"
cat "$W/card.txt" "$W/steps.txt"
