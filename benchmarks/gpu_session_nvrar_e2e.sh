#!/usr/bin/env bash
# After an NVRAR change, on 4 GPUs in one call: a full tune (the profile the served model
# uses), every backend side by side (4K..64M, the README's table), then SGLang end to end with
# CONFIGS (default "nccl,artune_nccl": SGLang's custom all-reduce off, NCCL alone vs artune).
#
#   device run, carry [".devwhl"], timeout 600:  bash benchmarks/gpu_session_nvrar_e2e.sh
set -uo pipefail
W=/tmp/artune-gpu-e2e
source benchmarks/gpu_lib.sh
step tune4 200 python3 -m artune.cli tune --device cuda --nproc-per-node 4 --out "$W/full.json"
step allreduce4 150 torchrun --nproc-per-node 4 benchmarks/allreduce.py \
    --out "$W/allreduce_4gpu.md"
LEFT=$(( 585 - ($(date +%s) - T0) ))
if [ -f "$W/full.json" ] && [ "$LEFT" -gt 150 ]; then
    CONFIGS=${CONFIGS:-nccl,artune_nccl} BUDGET_S=$LEFT bash benchmarks/gpu_session_sglang.sh \
        "$W/full.json" 4 > "$W/e2e.log" 2>&1
    echo "e2e exit $? (at $(( $(date +%s) - T0 ))s)" | tee -a "$W/steps.txt"
fi
cat "$W/card.txt" "$W/steps.txt"
grep -A 3 "^validation: routed all-reduce within" "$W/tune4.log" | cut -c1-220
grep '^|' "$W/allreduce_4gpu.md" 2>/dev/null || tail -n 20 "$W/allreduce4.log"
tail -n 14 "$W/e2e.log"
