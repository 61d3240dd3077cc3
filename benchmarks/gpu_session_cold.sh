#!/usr/bin/env bash
# The timed tunes on a fresh 4-GPU machine, each with every build cache cold: Triton's
# (tune_time.py gives each tune an empty TRITON_CACHE_DIR) and SGLang's JIT cache (tvm-ffi,
# emptied before each tune), --quick first; then NVRAR and SGLang on 2 of the GPUs.
#
#   device run, carry [".devwhl"], on a fresh (not warm) machine:  bash benchmarks/gpu_session_cold.sh
#   NO_2GPU=1: the tunes only. TEST_K=EXPR: then `pytest tests/gpu/test_nvrar_gpu.py -k EXPR`.
#   NO_QUICK=1: the full tune only. NO_EXTRA=1: not select_speed and router_eager either.
set -uo pipefail
W=/tmp/artune-gpu-cold
source benchmarks/gpu_lib.sh
JIT=${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}
echo "SGLang JIT cache before the first tune: $(du -sh "$JIT" 2>/dev/null || echo absent)" | tee "$W/jit.txt"
if [ -z "${NO_QUICK:-}" ]; then
rm -rf "$JIT"
step quick4 90 python3 benchmarks/tune_time.py --nproc-per-node 4 --only quick \
    --results "$W/tune_time_4gpu_quick.json" --keep "$W/q4"
fi
rm -rf "$JIT"
step tune4 240 python3 benchmarks/tune_time.py --nproc-per-node 4 --only full \
    --results "$W/tune_time_4gpu_full.json" --keep "$W/t4"
if [ -z "${NO_EXTRA:-}" ]; then
step select 60 python3 benchmarks/select_speed.py --device cuda --calls 50000 \
    --out "$W/select_speed_gpu_host.md"
step router 90 torchrun --nproc-per-node 4 benchmarks/router_eager.py --sizes 4K,64K,1M \
    --out "$W/router_eager_4gpu.md"
fi
if [ -n "${TEST_K:-}" ]; then
    step gputest 150 python3 -m pytest -q -s tests/gpu/test_nvrar_gpu.py -k "$TEST_K"
fi
if [ -z "${NO_2GPU:-}" ]; then
export CUDA_VISIBLE_DEVICES=0,1
step dev2 90 torchrun --nproc-per-node 2 benchmarks/nvrar_dev.py --pdl both \
    --sizes 4K,16K,64K,256K --out "$W/nvrar_dev_2gpu.json"
step bench2 60 torchrun --nproc-per-node 2 benchmarks/allreduce.py --backends nccl,sglang,nvrar \
    --sizes 4K,16K,64K,256K,1M --out "$W/allreduce_2gpu.md"
unset CUDA_VISIBLE_DEVICES
fi
tail -n 4 "$W"/q4/*.sglang-jit.log "$W"/t4/*.sglang-jit.log 2>/dev/null
cat "$W/jit.txt" "$W/card.txt" "$W/steps.txt"
for f in "$W"/tune_time_*.json; do
    [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(r['kind'], r['wall_s'], 's rc', r['returncode'], r.get('validation_within'), '/', r.get('validation_points'), {k: v for k, v in r['seconds_by_phase'].items() if ':' not in k or 'sglang' in k}) for r in d['runs']]" "$f"
done
grep -h -A8 "^NVRAR vs NCCL\|^programmatic" "$W/dev2.log" 2>/dev/null
cat "$W/allreduce_2gpu.md" 2>/dev/null
tail -n 6 "$W/select_speed_gpu_host.md" 2>/dev/null
tail -n 12 "$W/router_eager_4gpu.md" 2>/dev/null || tail -n 20 "$W/router.log"
tail -n 5 "$W/gputest.log" 2>/dev/null
