#!/usr/bin/env bash
# ARTUNE_NVRAR_CLEAR_AHEAD on NPROC GPUs (default 4): is it correct there, and does emptying the
# previous call's lamport slots while waiting (three parities) beat emptying one's own at the end?
#
#   device run, carry [".devwhl"]:  NPROC=4 bash benchmarks/gpu_session_ahead.sh
#
# 1. NVRAR's GPU tests with it on (TEST_K, default: the skewed lamport graph with it off and on,
#    the NPROC-rank sweep, the soak, the timeouts);
# 2. benchmarks/nvrar_ahead.py: NVRAR with it off and on in one process, same-size sequences and
#    a small call after a large one (the switch's worst case), alternating rounds;
# 3. SGLang's own all-reduce and NVRAR (defaults) in CUDA graphs with it on (allreduce.py): is
#    NVRAR now ahead of SGLang's at 4K-128K? (The fifth to seventh sessions' 4-GPU tables are
#    the same run with it off.)
set -uo pipefail
W=/tmp/artune-gpu-ahead
source benchmarks/gpu_lib.sh
N=${NPROC:-4}
SIZES=${SIZES:-4K,16K,64K,128K,256K,512K,1M,2M}
ARTUNE_NVRAR_CLEAR_AHEAD=1 step gputest_ahead 300 python3 -m pytest -q -s \
    tests/gpu/test_nvrar_gpu.py -k "${TEST_K:-skewed or sweep_${N}_ranks or soak or times_out}"
step nvrar_ahead 180 torchrun --nproc-per-node "$N" benchmarks/nvrar_ahead.py \
    --out "$W/nvrar_ahead_${N}gpu.md"
ARTUNE_NVRAR_CLEAR_AHEAD=1 step allreduce_ahead 120 torchrun --nproc-per-node "$N" \
    benchmarks/allreduce.py --backends nccl,sglang,nvrar --sizes "$SIZES" \
    --out "$W/allreduce_ahead_${N}gpu.md"
cat "$W/card.txt" "$W/steps.txt"
tail -n 5 "$W/gputest_ahead.log"
for f in "$W"/nvrar_ahead*.md "$W"/allreduce_ahead*.md; do
    echo "== $f"; grep '^|' "$f" | head -n 14
done
