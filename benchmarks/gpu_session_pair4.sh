#!/usr/bin/env bash
# A TP=4 paired default/artune run (issue #4's "within 1 % at every batch size"), with what the
# machine was doing around it, and optionally the GPU tests of the CPU-only changes first:
#   - TESTS=1 (default): tests/gpu/test_ops_gpu.py (ops.setup: the setup agreements through
#     agree.gather, which since the seventeenth session goes through the group's store) and
#     test_nvrar_gpu.py -k times_out (NVRAR's close after a forced timeout: the ranks agree
#     through the store before the collective free);
#   - ORDER=artune,default (default) or default,artune: the engines' start order; REPS rounds
#     (default 30) at bs 1, 4, 16 and 64 with the reference profile;
#   - the load average, CPU count and GPU clocks before and after (a loaded host shows as
#     steps that vary from rep to rep; this says whether the host was busy).
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4:  bash benchmarks/gpu_session_pair4.sh
#   the other order on the same warm machine:  TESTS=0 ORDER=default,artune bash ...
set -uo pipefail
W=/tmp/artune-gpu-pair4
source benchmarks/gpu_lib.sh
machine() {  # machine LABEL: one snapshot of the host's load and the GPUs' clocks
    { echo "== $1 (at $(( $(date +%s) - T0 )) s): $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
      nvidia-smi --query-gpu=index,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,utilization.gpu \
          --format=csv,noheader; } | tee -a "$OUT/machine-pair4.txt"
}
machine "before"
if [ "${TESTS:-1}" = 1 ]; then
    step tests 200 python3 -m pytest -q -rs tests/gpu/test_ops_gpu.py tests/gpu/test_nvrar_gpu.py \
        -k "setup_serves or times_out"
    grep -h "passed\|failed\|error" "$W/tests.log" | tail -3
fi
cat "$W/steps.txt" 2>/dev/null
PAIRED=${ORDER:-artune,default} REPS=${REPS:-30} BUDGET_S=$(( 580 - ($(date +%s) - T0) )) \
    bash benchmarks/gpu_session_sglang.sh artune/profiles/6eeb601b655cf21c.json 4
machine "after"
