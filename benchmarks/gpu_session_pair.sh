#!/usr/bin/env bash
# A paired end-to-end run on every GPU of the machine (TP = the GPU count, 2 or 4), issue #4's
# "within 1 % at every batch size" and the compiled comparisons, with what the machine was doing
# around it, and optionally GPU tests first:
#   - TESTS=1 (default): tests/gpu/test_ops_gpu.py (ops.setup: the setup agreements through
#     agree.gather, which goes through the group's store) and test_nvrar_gpu.py -k times_out
#     (NVRAR's close after a forced timeout: the ranks agree through the store before the
#     collective free); TESTS_K=EXPR runs the tests of those two files that EXPR selects;
#   - ORDER: the engines and their start order (default artune,default; e.g. default,artune,
#     or default_compile,artune_compile with TIMEOUT_S=420 on a cold inductor cache, or the
#     compiled A/A pair default_compile,default_compile_again); REPS rounds (default 30) at
#     BATCH_SIZES (default 1,4,16,64) with the machine's reference profile;
#   - GEMM=aten: inductor's GEMMs pinned to cuBLAS in every engine
#     (TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN, recorded in the results' compile_env), so
#     the ranks and engines of a compiled pair run the same GEMMs instead of each rank picking
#     its own by max-autotune's timings (seen in the eighteenth session: three different kernels
#     for one shape in one engine's four ranks);
#   - INDUCTOR=det: TORCHINDUCTOR_DETERMINISTIC=1 in every engine (inductor skips its on-device
#     benchmarking, so every rank and engine of one config should compile the same kernels): the
#     27l session's compiled A/A pair differed by -4.1 / +0.9 / +6.4 % in the decode graphs'
#     GPU time at bs 1 / 4 / 16 without it, where the uncompiled A/A pair agreed within 0.5 %;
#   - every engine times its decode graphs on the GPU (ARTUNE_GRAPH_TIMES, set by
#     sglang_e2e.py): the summary gives each pair's GPU-time comparison beside the wall clock's;
#   - TAG=NAME: the results file and log named ..._NAME, for two pairs in one call (e.g.
#     TAG=nccl ORDER=nccl,artune_nccl LIMIT_S=290 ...; TAG=default ORDER=default,artune ...,
#     on a warm machine: a fresh one's wheel install leaves the first pair below the budget
#     guard below, so give that one more or set MIN_PAIR_S);
#   - LIMIT_S (default 580): the seconds the whole script may take (the pair's budget is what
#     is left of it), for a call with less device time left; a budget below what the engines
#     and a few rounds need (95 s per engine + 75 s; MIN_PAIR_S overrides) skips the pair
#     (status 4) before any engine starts (the estimate leaves out the quick tune that
#     gpu_session_sglang.sh runs first where no profile of the machine exists);
#   - NEED_PROFILE=1: stop (status 3) where no committed profile is of this card and GPU
#     count, instead of tuning the machine;
#   - the load average, CPU count and GPU clocks before and after (a loaded host shows as steps
#     that vary from rep to rep; this says whether the host was busy).
# Eighteenth session (as gpu_session_pair4.sh, 4x H100): 491 s fresh with the tests, 343 s warm
# for an uncompiled pair, 495 s warm for a compiled pair on a partly warm inductor cache.
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4 or -x2:  bash benchmarks/gpu_session_pair.sh
#   the other order on the same warm machine:  TESTS=0 ORDER=default,artune bash ...
set -uo pipefail
W=/tmp/artune-gpu-pair
source benchmarks/gpu_lib.sh
N=$(nvidia-smi -L | wc -l)
PROF=$(reference_profile) || if [ "${NEED_PROFILE:-0}" = 1 ]; then
    echo "NEED_PROFILE=1: no profile of this card and GPU count, so no tune and no run"; exit 3
fi  # otherwise gpu_session_sglang.sh tunes this machine
machine() {  # machine LABEL: one snapshot of the host's load and the GPUs' clocks
    { echo "== $1 (at $(( $(date +%s) - T0 )) s): $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
      nvidia-smi --query-gpu=index,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu \
          --format=csv,noheader; } | tee -a "$OUT/machine-pair.txt"
}
machine "before"
case "${GEMM:-}" in
    "") ;;
    aten) export TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN
          echo "inductor GEMMs pinned to cuBLAS (TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS=ATEN)" ;;
    *) echo "GEMM=$GEMM: only GEMM=aten is known"; exit 1 ;;
esac
case "${INDUCTOR:-}" in
    "") ;;
    det) python3 -c "import torch._inductor.config as c; assert hasattr(c, 'deterministic')" \
             || { echo "INDUCTOR=det: this torch's inductor has no deterministic mode"; exit 1; }
         export TORCHINDUCTOR_DETERMINISTIC=1
         echo "inductor's on-device benchmarking off (TORCHINDUCTOR_DETERMINISTIC=1)" ;;
    *) echo "INDUCTOR=$INDUCTOR: only INDUCTOR=det is known"; exit 1 ;;
esac
if [ "${TESTS:-1}" = 1 ]; then
    step tests 200 python3 -m pytest -q -rs tests/gpu/test_ops_gpu.py tests/gpu/test_nvrar_gpu.py tests/test_graph_times.py \
        -k "${TESTS_K:-setup_serves or times_out}"
    grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
fi
cat "$W/steps.txt" 2>/dev/null
BUDGET=$(( ${LIMIT_S:-580} - ($(date +%s) - T0) ))
# Engines start in 60-90 s each (compiled ones too, on a warm inductor cache); the paired run
# keeps 45 s for the end and 15 s per engine for the logprob check. A budget below that and a
# few rounds starts the engines for nothing (the 28th session's compiled A/A pair: 257 s, two
# engines up, no round), so the pair is skipped instead; MIN_PAIR_S overrides the estimate.
ENGINES=$(echo "${ORDER:-artune,default}" | tr ',' '\n' | grep -c .)
NEED=${MIN_PAIR_S:-$(( ENGINES * (80 + 15) + 45 + 30 ))}
if [ "$BUDGET" -lt "$NEED" ]; then
    echo "pair skipped: ${BUDGET} s left, below the ${NEED} s that ${ENGINES} engines and a few rounds need (LIMIT_S, or MIN_PAIR_S to override)"
    exit 4
fi
PAIRED=${ORDER:-artune,default} REPS=${REPS:-30} BUDGET_S=$BUDGET \
    bash benchmarks/gpu_session_sglang.sh "$PROF" "$N"
machine "after"
