#!/usr/bin/env bash
# ARTUNE_NVRAR_CLEAR_AHEAD on NPROC GPUs (default 4): is it correct there, and does emptying the
# previous call's lamport slots while waiting (three parities) beat emptying one's own at the end?
#
#   device run, carry [".devwhl"]:  NPROC=4 bash benchmarks/gpu_session_ahead.sh
#
# 1. NVRAR's GPU tests with it on (TEST_K, default the NPROC-rank sweep, the soak, the timeout);
# 2. SGLang's own all-reduce and NVRAR (defaults) in CUDA graphs, 4K-2M, with it off and on,
#    twice in alternating order (off, on, off, on): SGLang's column is each run's anchor.
set -uo pipefail
W=/tmp/artune-gpu-ahead
source benchmarks/gpu_lib.sh
N=${NPROC:-4}
SIZES=${SIZES:-4K,16K,64K,128K,256K,512K,1M,2M}
ARTUNE_NVRAR_CLEAR_AHEAD=1 step gputest_ahead 300 python3 -m pytest -q -s \
    tests/gpu/test_nvrar_gpu.py -k "${TEST_K:-sweep_${N}_ranks or soak or times_out}"
for run in 1 2; do
    for ahead in 0 1; do
        ARTUNE_NVRAR_CLEAR_AHEAD=$ahead step "allreduce_ahead${ahead}_run${run}" 120 torchrun \
            --nproc-per-node "$N" benchmarks/allreduce.py --backends sglang,nvrar \
            --sizes "$SIZES" --out "$W/allreduce_ahead${ahead}_run${run}_${N}gpu.md"
    done
done
cat "$W/card.txt" "$W/steps.txt"
tail -n 5 "$W/gputest_ahead.log"
for f in "$W"/allreduce_ahead*.md; do echo "== $f"; grep '^|' "$f" | head -n 12; done
