#!/usr/bin/env bash
# The fused linear kernel with the MLP's activation in it (act=True: the down projection takes
# gate_up's output and applies silu(gate) * up as its tiles load; docs/nvrar.md), on a 2- or
# 4-GPU machine, before any serving side is built for it (not yet run; written in the 27th
# session, which had no device time left):
#   - tests/gpu/test_nvrar_gpu.py -k linear_all_reduce (its last three cases take gate and up);
#   - benchmarks/linear_ar.py --act: Llama-3.1-8B's down_proj at TP = the GPUs (K 14336 / N)
#     from the gate_up output at 1 / 4 / 16 / 64 rows: SGLang's activation kernel then cuBLAS
#     + SGLang's all-reduce (what SGLang serves), the activation kernel then the fused kernel
#     (what artune serves today), and the fused kernel with the activation in it. The question:
#     is the last one faster than the second by about an activation kernel (its launch and
#     ~1-2 µs), or does the extra gate/up load cost more than it saves?
#
#   device run, carry [".devwhl"], kind nvidia-h100-x2 or -x4:  bash benchmarks/gpu_session_act.sh
set -uo pipefail
W=/tmp/artune-gpu-act
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
if [ "${TESTS:-1}" = 1 ]; then
    step tests 240 python3 -m pytest -q -rs tests/gpu/test_nvrar_gpu.py -k linear_all_reduce
    grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
fi
step micro 240 python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
    benchmarks/linear_ar.py --act --shapes "$((14336 / N))x4096" --rows 1,4,16,64 \
    --variants 32x256s5,32x256s5a,32x256s4a,32x128s5a --out "$OUT/linear_ar_act_${N}gpu.md"
head -30 "$OUT/linear_ar_act_${N}gpu.md" 2>/dev/null || tail -20 "$W/micro.log"
cat "$W/card.txt" "$W/steps.txt"
