#!/usr/bin/env bash
# One GPU call that runs, on the GPU, what a session changed and tested on the CPU only. First
# run in the seventeenth session (all passed, benchmarks/results/gpu_session_2026-11-27e.md);
# since then agree.gather goes through the group's store (the plugin's setup agreements and
# NVRAR's close use it: the SGLang engines and -k times_out below run it). What it runs:
#   - ops.setup: a profile served on an NCCL group (tests/gpu/test_ops_gpu.py);
#   - NVRAR's close after a forced timeout (the ranks agree before the collective free) and the
#     skewed lamport graph (tests/gpu/test_nvrar_gpu.py -k "times_out or skewed");
#   - every backend against dist.all_reduce, incl. the errors after close (test_backends_gpu.py);
#   - the SGLang plugin's setup through group_setup.build_router: SGLang default and artune
#     with the machine's reference profile, one engine each, bs 1 and 16
#     (gpu_session_sglang.sh; a quick tune first when the profile is not this machine's).
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4:  bash benchmarks/gpu_session_check.sh
set -uo pipefail
W=/tmp/artune-gpu-check
source benchmarks/gpu_lib.sh
step test_ops 120 python3 -m pytest -q -x tests/gpu/test_ops_gpu.py
step test_nvrar 240 python3 -m pytest -q tests/gpu/test_nvrar_gpu.py -k "times_out or skewed"
step test_backends 180 python3 -m pytest -q tests/gpu/test_backends_gpu.py
N=$(nvidia-smi -L | wc -l)
PROF=$(reference_profile) || exit 1
cat "$W/steps.txt"
for t in test_ops test_nvrar test_backends; do grep -h "passed\|failed\|error" "$W/$t.log" | tail -1; done
CONFIGS=default,artune BATCH_SIZES=1,16 BUDGET_S=$(( 585 - ($(date +%s) - T0) )) \
    bash benchmarks/gpu_session_sglang.sh "$PROF" "$N"
