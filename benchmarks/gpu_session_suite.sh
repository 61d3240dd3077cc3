#!/usr/bin/env bash
# One call that runs the whole GPU test suite on every GPU of the machine (on 4 GPUs the 3- and
# 4-rank tests that a 2-GPU machine skips: the 4-rank and 3-rank sweeps, 2x2 virtual nodes,
# the 4-rank graph and compile checks), then every backend side by side (allreduce.py, graph,
# bf16) with the machine's reference profile, then again with the two-shot lamport without PDL
# (ARTUNE_NVRAR_TWOSHOT_PDL=off; the default is wait since the 32nd session) at the sizes that
# it takes on more than 2 GPUs. Each step is time-limited (`step`): the
# suite keeps per-test lines (-v) in its log, so a step cut short still says how far it came.
#
#   device run, carry [".devwhl"], kind nvidia-h200-x4:  bash benchmarks/gpu_session_suite.sh
#   SUITE_S (default 430): the test suite's limit; K=EXPR: only the tests EXPR selects.
set -uo pipefail
W=/tmp/artune-gpu-suite
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
step tests "${SUITE_S:-430}" python3 -m pytest -v -rs --durations=12 tests/gpu ${K:+-k "$K"}
grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
PROF=$(reference_profile) || PROF=""
CARD=$(card_slug)
D=$(date +%F)
step allreduce 90 torchrun --nproc-per-node "$N" benchmarks/allreduce.py ${PROF:+--profile "$PROF"} \
    --sizes 4K,8K,16K,32K,64K,128K,256K,512K,1M,2M,16M --out "$W/allreduce_${N}gpu_${CARD}_${D}.md"
ARTUNE_NVRAR_TWOSHOT_PDL=off step allreduce_off 60 torchrun --nproc-per-node "$N" \
    benchmarks/allreduce.py --backends nccl,sglang,nvrar --sizes 256K,512K,1M,2M \
    --out "$W/allreduce_${N}gpu_${CARD}_twoshot_pdl_off_${D}.md"
cat "$W/steps.txt"
for f in "$W"/allreduce_*.md; do echo "== $f"; grep "^|" "$f" | head -16; done
