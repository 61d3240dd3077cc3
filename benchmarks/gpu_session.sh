#!/usr/bin/env bash
# One GPU-machine call that produces the committed GPU results (4 GPUs, then 2 of them).
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session.sh
#   KERNELS_ONLY=1: NVRAR's plans (DIAG=1: and breakdown), all backends and the NVRAR GPU tests only;
#   TUNES_ONLY=1: the timed tunes only (with SKIP_2GPU=1: 4 GPUs only).
#
# .devwhl: see gpu_lib.sh. Every step has its own time limit so that a slow or failing step leaves
# the others' results; logs and results land in $OUT.
set -uo pipefail
W=/tmp/artune-gpu-session
source benchmarks/gpu_lib.sh

A=benchmarks/allreduce.py
if [ -n "${KERNELS_ONLY:-}" ]; then
    # NVRAR first (one call, < 600 s): every plan incl. the lamport one-shot and both wait
    # loops' choice, the one-shot breakdown, all backends side by side, the GPU tests.
    step dev4 150 torchrun --nproc-per-node 4 benchmarks/nvrar_dev.py --pdl both \
        --sizes 4K,16K,64K,256K,1M --out "$W/nvrar_dev_4gpu.json"
    [ -n "${DIAG:-}" ] && step diag4 60 torchrun --nproc-per-node 4 benchmarks/nvrar_dev.py --diag \
        --sizes 4K,16K,64K --out "$W/nvrar_diag_4gpu.json"
    step bench4 80 torchrun --nproc-per-node 4 $A --out "$W/allreduce_4gpu.md"
    ARTUNE_NVRAR_PDL=1 step bench4pdl 45 torchrun --nproc-per-node 4 $A --backends nccl,sglang,nvrar \
        --sizes 4K,16K,64K,256K,1M --out "$W/allreduce_4gpu_pdl.md"
    step test_nvrar 280 python3 -m pytest -q -s tests/gpu/test_nvrar_gpu.py
    cat "$W/steps.txt"
    grep -h -A14 "^NVRAR vs NCCL\|^one-shot protocols\|^one-shot breakdown\|^programmatic" \
        "$W/dev4.log" "$W/diag4.log" 2>/dev/null
    cat "$W/allreduce_4gpu.md" "$W/allreduce_4gpu_pdl.md" 2>/dev/null
    grep -h "passed\|failed" "$W/test_nvrar.log" | tail -3
    exit 0
fi
# 4 GPUs: the full tune (timed, cold Triton cache), then every backend side by side with the
# routed dispatch, then the quick tune (cold too).
step tune4 240 python3 benchmarks/tune_time.py --nproc-per-node 4 --only full \
    --results "$W/tune_time_4gpu.json" --keep "$W/t4"
P4=$W/t4/full.json
[ -f "$P4" ] && PROF4=(--profile "$P4") || PROF4=()
[ -z "${TUNES_ONLY:-}" ] && step bench4 80 torchrun --nproc-per-node 4 $A "${PROF4[@]}" --out "$OUT/allreduce_4gpu.md"
[ -z "${TUNES_ONLY:-}" ] && step diag4 60 torchrun --nproc-per-node 4 benchmarks/nvrar_dev.py --diag \
    --sizes 4K,16K,64K --out "$W/nvrar_diag_4gpu.json"
step quick4 90 python3 benchmarks/tune_time.py --nproc-per-node 4 --only quick \
    --results "$W/tune_time_4gpu_quick.json" --keep "$W/q4"
# 2 virtual nodes x 2 GPUs: NVRAR's inter-node path beside NCCL (emulation).
[ -z "${TUNES_ONLY:-}" ] && step emu2x2 35 torchrun --nproc-per-node 4 $A --backends nccl,nvrar --ranks-per-node 2 \
    --sizes 4K,64K,256K,1M,2M,16M --out "$OUT/allreduce_2x2_emulated.md"
# 2 GPUs (two of the four, NV18 between them): a quick tune, then the benchmark.
if [ -z "${SKIP_2GPU:-}" ]; then
export CUDA_VISIBLE_DEVICES=0,1
step tune2 90 python3 -m artune.cli tune --nproc-per-node 2 --quick --out "$W/t2/quick.json"
P2=$W/t2/quick.json
[ -f "$P2" ] && PROF2=(--profile "$P2") || PROF2=()
[ -z "${TUNES_ONLY:-}" ] && step bench2 45 torchrun --nproc-per-node 2 $A "${PROF2[@]}" --sizes 4K,16K,64K,256K,1M,4M,16M \
    --out "$OUT/allreduce_2gpu.md"
unset CUDA_VISIBLE_DEVICES
fi
if [ -n "${WITH_TESTS:-}" ]; then
export CUDA_VISIBLE_DEVICES=0,1
step test_tune_gpu 60 python3 -m pytest -q -x tests/test_tune_gpu.py
unset CUDA_VISIBLE_DEVICES
# NVRAR's GPU tests: sweeps on 4, 3 and 2 ranks and 2x2 virtual nodes, compile + soak, timeout.
step test_nvrar 150 python3 -m pytest -q -s tests/gpu/test_nvrar_gpu.py
fi

cat "$W/steps.txt"
for f in "$OUT"/allreduce_*.md; do [ -f "$f" ] && { echo; cat "$f"; }; done
for f in "$OUT"/tune_time_*.json; do
    [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(r['kind'], r['wall_s'], 's rc', r['returncode'], r.get('measurements'), r.get('validation_within'), '/', r.get('validation_points')) for r in d['runs']]" "$f"
done
ls "$OUT"   # tune logs and Optuna storages are in logs-*.tgz
