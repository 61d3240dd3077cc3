#!/usr/bin/env bash
# What the twenty-second session left unrun, in one call on a 2-GPU machine:
#   - the fused-linear phase's GPU test in its final form (tests/test_tune_gpu.py -k linear:
#     a quick 2-GPU tune with --linear-shapes, its linear section, and a --resume that re-times
#     only the back-to-back pairs);
#   - a full 2-GPU tune with --linear-model (Llama-3.1-8B at TP=2), kept as
#     /tmp/artune-tuned-2gpu.json and returned (the twenty-third session's run of it is the
#     committed 2x H100 profile);
#   - the TP=2 pair against SGLang's default with that profile (logprob check included):
#     PAIRED=default,artune, BATCH_SIZES (default 1,4,16), REPS (default 16).
#
# Twenty-third session: 418 s on a fresh 2x H100 machine (log
# benchmarks/results/gpu_session_2026-11-27k.md, call 1).
#
#   device run, carry [".devwhl"], kind nvidia-h100-x2:  bash benchmarks/gpu_session_linear_next.sh
set -uo pipefail
W=/tmp/artune-gpu-next
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
step tests 150 python3 -m pytest -q -s -rs tests/test_tune_gpu.py -k linear
grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
mkdir -p "$W/llama"
python3 - "$W/llama/config.json" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from sglang_e2e import LLAMA_31_8B
json.dump(LLAMA_31_8B, open(sys.argv[1], "w"))
PY
step tune 200 python3 -m artune.cli tune --linear-model "$W/llama" --out "$W/profile_${N}gpu_linear.json"
cp "$W/profile_${N}gpu_linear.json" "/tmp/artune-tuned-${N}gpu.json" 2>/dev/null
python3 -m artune.cli show "$W/profile_${N}gpu_linear.json" > "$W/profile_${N}gpu_linear_show.md" 2>&1
grep -A12 "row-parallel linear" "$W/profile_${N}gpu_linear_show.md" || tail -20 "$W/tune.log"
cat "$W/card.txt" "$W/steps.txt"
PAIRED=${ORDER:-default,artune} REPS=${REPS:-16} BATCH_SIZES=${BATCH_SIZES:-1,4,16} \
    BUDGET_S=$(( 585 - ($(date +%s) - T0) )) \
    bash benchmarks/gpu_session_sglang.sh "$W/profile_${N}gpu_linear.json" "$N" 2>&1 | tail -30
