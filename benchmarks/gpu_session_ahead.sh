#!/usr/bin/env bash
# ARTUNE_NVRAR_CLEAR_AHEAD on NPROC GPUs (default: every GPU of the machine): is it correct
# there, and does emptying the previous call's lamport slots while waiting (three parities) beat
# emptying one's own at the end?
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session_ahead.sh            (~7 min)
#                                   PHASES=tests bash benchmarks/gpu_session_ahead.sh (~4 min)
#
# PHASES (default "skewed bench"; each step has its own time limit, so that one call stays
# inside the device's 600 s with the wheel install):
#   skewed  the GPU test that hunts the switch's races: lamport one-shots and two-shots of mixed
#           sizes in one graph, one rank held back before each call in turn, off and on;
#   bench   benchmarks/nvrar_ahead.py (NVRAR off vs on in one process, same-size sequences and
#           a small call after a large one, alternating rounds), then SGLang's own all-reduce and
#           NVRAR (defaults) in CUDA graphs with it on (allreduce.py): is NVRAR now ahead of
#           SGLang's at 4K-128K? (The fifth to seventh sessions' 4-GPU tables: it off.)
#   tests   NVRAR's other GPU tests with it on (TEST_K: the NPROC-rank sweep, soak, timeouts).
set -uo pipefail
W=/tmp/artune-gpu-ahead
source benchmarks/gpu_lib.sh
N=${NPROC:-$(nvidia-smi -L | wc -l)}
SIZES=${SIZES:-4K,16K,64K,128K,256K,512K,1M,2M}
# Waits bounded at 20 s, not 60 (a race would otherwise hold each replay for a minute); first-use
# compiles of the same kernels on every rank stay well inside it.
export ARTUNE_TIMEOUT_S=${ARTUNE_TIMEOUT_S:-20}
for phase in ${PHASES:-skewed bench}; do
    case $phase in
    skewed)
        step gputest_skewed 150 python3 -m pytest -q -s \
            "tests/gpu/test_nvrar_gpu.py::test_skewed_lamport_sequence_in_a_graph" ;;
    bench)
        step nvrar_ahead 150 torchrun --nproc-per-node "$N" benchmarks/nvrar_ahead.py \
            --out "$W/nvrar_ahead_${N}gpu.md"
        ARTUNE_NVRAR_CLEAR_AHEAD=1 step allreduce_ahead 120 torchrun --nproc-per-node "$N" \
            benchmarks/allreduce.py --backends nccl,sglang,nvrar --sizes "$SIZES" \
            --out "$W/allreduce_ahead_${N}gpu.md" ;;
    tests)
        ARTUNE_NVRAR_CLEAR_AHEAD=1 step gputest_ahead 300 python3 -m pytest -q -s \
            tests/gpu/test_nvrar_gpu.py \
            -k "${TEST_K:-(sweep_${N}_ranks and not without_pdl) or soak or times_out}" ;;
    *) echo "unknown phase $phase (skewed, bench, tests)"; exit 2 ;;
    esac
done
cat "$W/card.txt" "$W/steps.txt"
for f in "$W"/gputest_*.log; do [ -f "$f" ] && { echo "== $f"; tail -n 5 "$f"; }; done
for f in "$W"/nvrar_ahead*.md "$W"/allreduce_ahead*.md; do
    [ -f "$f" ] && { echo "== $f"; grep '^|' "$f" | head -n 14; }
done
