#!/usr/bin/env bash
# One call on every GPU of the machine (a call for nvidia-h200-x4 may run on H100s), the first of
# two; the second is the three-engine pair for issue #4's NCCL-only target:
#   TESTS=0 ORDER=nccl,artune_nccl,default REPS=20 BATCH_SIZES=1,4,16 bash benchmarks/gpu_session_pair.sh
# This one:
#   - the GPU tests of the fused all-reduce + residual add + RMSNorm (its kernel's last change,
#     the exchange's bound and record, ran on no GPU before) and ops.setup's agreements;
#   - a profile of this machine: a committed one of this card and GPU count if there is one,
#     otherwise a full tune, timed with a cold Triton cache (tune_time.py), kept as
#     /tmp/artune-tuned-<N>gpu.json for the next call on this warm machine (reference_profile
#     finds it there) and returned with its `artune show`;
#   - every backend side by side (allreduce.py, graph, bf16) with that profile's routes.
#
#   device run, carry [".devwhl"], kind nvidia-h200-x4:  bash benchmarks/gpu_session_card.sh
# Twenty-first session: H100s came (4x); 159 s on a fresh machine with the committed profile.
# The H200 branch (no committed 4x H200 profile: the full tune) has not run.
set -uo pipefail
W=/tmp/artune-gpu-card
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
CARD=$(card_slug)
step tests 240 python3 -m pytest -q -s -rs tests/gpu/test_ops_gpu.py tests/gpu/test_nvrar_gpu.py \
    -k "setup_serves or fused"
grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
if ! PROF=$(reference_profile); then
    step tune 240 python3 benchmarks/tune_time.py --nproc-per-node "$N" --only full \
        --results "$W/tune_time_${N}gpu_full_$CARD.json" --keep "$W/t"
    if [ -f "$W/t/full.json" ]; then
        cp "$W/t/full.json" "/tmp/artune-tuned-${N}gpu.json"
        cp "$W/t/full.json" "$W/profile_${N}gpu_$CARD.json"
        PROF=$W/t/full.json
        python3 -m artune.cli show "$PROF" > "$W/profile_${N}gpu_${CARD}_show.md" 2>&1
        cp "$W/profile_${N}gpu_${CARD}_show.md" "$OUT/"
    fi
fi
echo "profile: $PROF"
step bench 90 torchrun --nproc-per-node "$N" benchmarks/allreduce.py --profile "$PROF" \
    --sizes 4K,16K,64K,128K,256K,512K,1M,2M,16M --out "$W/allreduce_${N}gpu_$CARD.md"
cat "$W/card.txt" "$W/steps.txt"
cat "$W/allreduce_${N}gpu_$CARD.md" 2>/dev/null || tail -20 "$W/bench.log"
