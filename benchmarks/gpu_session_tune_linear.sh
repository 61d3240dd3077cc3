#!/usr/bin/env bash
# One call on every GPU of the machine: a full tune with the fused-linear phase for
# Llama-3.1-8B's row-parallel layers at TP = the GPU count (`artune tune --linear-model`), its
# `artune show`, then the GPU test of the phase (a quick 2-GPU tune with --linear-shapes, and
# its --resume). The profile stays as /tmp/artune-tuned-<N>gpu.json for the next call on this
# warm machine and comes back as profile_<N>gpu_<card>_linear.json.
#   - TESTS=0: no GPU test after the tune;
#   - BENCH=1: every backend side by side with the new profile's routes (allreduce.py, graph,
#     bf16, 4K-2M and 16M), as allreduce_<N>gpu_<card>.md.
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4:  bash benchmarks/gpu_session_tune_linear.sh
set -uo pipefail
W=/tmp/artune-gpu-linear
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
CARD=$(grep -q H200 "$W/card.txt" && echo h200 || echo h100)
mkdir -p "$W/llama"
python3 - "$W/llama/config.json" <<'PY'
import json, sys
sys.path.insert(0, "benchmarks")
from sglang_e2e import LLAMA_31_8B
json.dump(LLAMA_31_8B, open(sys.argv[1], "w"))
PY
# the tune's storage outside $W: a second call on this warm machine resumes it
T=/tmp/artune-linear-tune; mkdir -p "$T"
RESUME=$([ -s "$T/profile.json.optuna.db" ] && echo --resume)
step tune "${TUNE_S:-420}" python3 -m artune.cli tune --linear-model "$W/llama" \
    --out "$T/profile.json" $RESUME
cp "$T/profile.json" "$W/profile_${N}gpu_${CARD}_linear.json" 2>/dev/null
if grep -q '"linear": \[' "$W/profile_${N}gpu_${CARD}_linear.json" 2>/dev/null; then
    cp "$W/profile_${N}gpu_${CARD}_linear.json" "/tmp/artune-tuned-${N}gpu.json"
    python3 -m artune.cli show "$W/profile_${N}gpu_${CARD}_linear.json" \
        > "$W/profile_${N}gpu_${CARD}_linear_show.md" 2>&1
fi
if [ "${BENCH:-0}" = 1 ] && [ -f "/tmp/artune-tuned-${N}gpu.json" ]; then
    step bench 150 torchrun --nproc-per-node "$N" benchmarks/allreduce.py \
        --profile "/tmp/artune-tuned-${N}gpu.json" \
        --sizes 4K,8K,16K,32K,64K,128K,256K,512K,1M,2M,16M --out "$W/allreduce_${N}gpu_$CARD.md"
    cat "$W/allreduce_${N}gpu_$CARD.md" 2>/dev/null || tail -20 "$W/bench.log"
fi
LEFT=$(( 570 - ($(date +%s) - T0) ))
[ "${TESTS:-1}" = 1 ] && [ "$LEFT" -gt 60 ] && step tests "$LEFT" python3 -m pytest -q -s -rs tests/test_tune_gpu.py -k linear
grep -h "passed\|failed\|error" "$W/tests.log" 2>/dev/null | tail -3
cat "$W/card.txt" "$W/steps.txt"
grep -A12 "row-parallel linear" "$W/profile_${N}gpu_${CARD}_linear_show.md" 2>/dev/null \
    || tail -30 "$W/tune.log"
