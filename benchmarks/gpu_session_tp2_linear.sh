#!/usr/bin/env bash
# TP=2 with the fused-linear phase, in one call on a 2-GPU machine: a quick tune with
# `--linear-model` (Llama-3.1-8B's row-parallel layers at TP=2), then the pair for issue #4's
# NCCL-only target, custom all-reduce off in both engines:
#   PAIRED=nccl,artune_nccl at BATCH_SIZES (default 1,4,16), REPS rounds (default 12).
#
#   device run, carry [".devwhl"], kind nvidia-h100-x2:  bash benchmarks/gpu_session_tp2_linear.sh
set -uo pipefail
W=/tmp/artune-gpu-tp2
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
mkdir -p "$W/llama"
python3 - "$W/llama/config.json" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from sglang_e2e import LLAMA_31_8B
json.dump(LLAMA_31_8B, open(sys.argv[1], "w"))
PY
step tune 200 python3 -m artune.cli tune --quick --linear-model "$W/llama" \
    --out "$W/profile_${N}gpu_linear_quick.json"
python3 -m artune.cli show "$W/profile_${N}gpu_linear_quick.json" > "$W/profile_show.md" 2>&1
grep -A12 "row-parallel linear" "$W/profile_show.md" || tail -20 "$W/tune.log"
cat "$W/card.txt" "$W/steps.txt"
PAIRED=${ORDER:-nccl,artune_nccl} REPS=${REPS:-12} BATCH_SIZES=${BATCH_SIZES:-1,4,16} \
    BUDGET_S=$(( ${TOTAL_S:-585} - ($(date +%s) - T0) )) \
    bash benchmarks/gpu_session_sglang.sh "$W/profile_${N}gpu_linear_quick.json" "$N" 2>&1 | tail -30
