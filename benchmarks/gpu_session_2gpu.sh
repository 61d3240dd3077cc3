#!/usr/bin/env bash
# The GPU-machine calls on a 2-GPU kind (nvidia-h100-x2 / nvidia-h200-x2).
#
#   device run, carry [".devwhl"]:  PHASE=kernels bash benchmarks/gpu_session_2gpu.sh
#                                   PHASE=tunes   bash benchmarks/gpu_session_2gpu.sh
#
# kernels: NVRAR's plans with both one-shot wait loops (nvrar_dev.py --spin both), where the
#   one-shot's time goes (--diag), every backend side by side (allreduce.py), then the GPU tests
#   that fit 2 GPUs (NVRAR's 2-rank sweep, every backend against dist.all_reduce, a short tune).
# tunes: NVRAR's two-shot plans with both wait loops, the full and --quick tunes, timed with a
#   cold Triton cache (tune_time.py), then the backends side by side again with the full
#   tune's profile routing (the routed column).
#   NO_DEV=1 / NO_BENCH=1 leave out the first or the last of these.
# verify: NVRAR's final kernels (eighth session): every backend beside NVRAR's lamport one-shot
#   and two-shot plans, 4K..16M, then the NVRAR GPU tests that fit 2 GPUs.
# serve: a full tune (cold Triton cache, timed), then SGLang end to end at TP=2 with its profile
#   (CONFIGS, default nccl,artune_nccl,default,artune) in the time left; the profile and the
#   results come back. MERGE=FILE / CONFIGS=... for a second call (the torch.compile configs).
# card: what the card that came allows (a call for nvidia-h200-x2 may run on H100s). H200: the
#   serve phase with CONFIGS=default,artune at bs 4 and 16 (a fresh profile: the committed 2x
#   H200 one predates the incumbent rule). Otherwise: a paired default/artune run at TP=2
#   (30 rounds, bs 1, 4, 16, 64, default started first) with the 2x H100 reference profile.
set -uo pipefail
W=/tmp/artune-gpu-2gpu
source benchmarks/gpu_lib.sh
TR="torchrun --nproc-per-node 2"
A=benchmarks/allreduce.py
SIZES=4K,16K,64K,256K,1M,4M,16M
case "${PHASE:-kernels}" in
kernels)
    step dev2 150 $TR benchmarks/nvrar_dev.py --sizes 4K,16K,64K,256K,1M --spin both \
        --out "$W/nvrar_dev_2gpu.json"
    step diag2 60 $TR benchmarks/nvrar_dev.py --diag --sizes 4K,16K,64K \
        --out "$W/nvrar_diag_2gpu.json"
    step bench2 70 $TR $A --sizes $SIZES --out "$W/allreduce_2gpu.md"
    step test_nvrar_sweep2 100 python3 -m pytest -q -x -s tests/gpu/test_nvrar_gpu.py -k sweep_2
    step test_backends 180 python3 -m pytest -q -x tests/gpu/test_backends_gpu.py
    step test_tune_gpu 90 python3 -m pytest -q -x tests/test_tune_gpu.py
    ;;
tunes)
    [ -z "${NO_DEV:-}" ] && step dev2 60 $TR benchmarks/nvrar_dev.py --sizes 64K,256K,1M \
        --spin both --out "$W/nvrar_dev_2gpu.json"
    step tune2 200 python3 benchmarks/tune_time.py --nproc-per-node 2 --only full \
        --results "$W/tune_time_2gpu_full.json" --keep "$W/t2"
    P2=$W/t2/full.json
    [ -f "$P2" ] && cp "$P2" "$W/profile_2gpu_full.json" && PROF=(--profile "$P2") || PROF=()
    [ -z "${NO_BENCH:-}" ] && step bench2r 70 $TR $A "${PROF[@]}" --sizes $SIZES --out "$W/allreduce_2gpu.md"
    step quick2 90 python3 benchmarks/tune_time.py --nproc-per-node 2 --only quick \
        --results "$W/tune_time_2gpu_quick.json" --keep "$W/q2"
    ;;
verify)
    ONE="nvrar:algo=oneshot,proto=lamport,ctas=128,block"
    TWO="nvrar:algo=twoshot,proto=lamport,ctas=128,block"
    step bench2 240 $TR $A --variant ${ONE}=512 --variant ${TWO}=512 --variant ${TWO}=1024 \
        --variant ${TWO}=2048 --sizes 4K,16K,64K,128K,256K,512K,1M,2M,4M,16M \
        --out "$W/allreduce_2gpu.md"
    step test_nvrar2 280 python3 -m pytest -q -s tests/gpu/test_nvrar_gpu.py \
        -k "sweep_2_ranks or soak or times_out"
    ;;
card)
    if ! grep -q H200 "$W/card.txt"; then
        PAIRED=default,artune REPS=30 BUDGET_S=$(( 585 - ($(date +%s) - T0) )) \
            bash benchmarks/gpu_session_sglang.sh artune/profiles/4b6998f7355af1ed.json 2
        exit 0
    fi
    export CONFIGS=default,artune BATCH_SIZES=4,16
    ;&  # on into serve
serve)
    if [ -z "${MERGE:-}" ]; then
        step tune2 230 python3 benchmarks/tune_time.py --nproc-per-node 2 --only full \
            --results "$W/tune_time_2gpu_full.json" --keep "$W/t2"
        P2=$W/t2/full.json
        [ -f "$P2" ] && cp "$P2" "$W/profile_2gpu_full.json"
    else
        P2=${PROFILE:?PROFILE=the profile of the first serve call}
    fi
    LEFT=$(( 585 - ($(date +%s) - T0) ))
    if [ -f "$P2" ] && [ "$LEFT" -gt 150 ]; then
        CONFIGS=${CONFIGS:-nccl,artune_nccl,default,artune} BUDGET_S=$LEFT \
            bash benchmarks/gpu_session_sglang.sh "$P2" 2 > "$W/e2e.log" 2>&1
        echo "e2e exit $? (at $(( $(date +%s) - T0 ))s)" | tee -a "$W/steps.txt"
        cat "$W/card.txt" "$W/steps.txt" > "$OUT/steps-${W##*/}.txt"
    fi
    tail -n 16 "$W/e2e.log" 2>/dev/null
    grep -A 3 "^validation: routed all-reduce within" "$W"/t2/*.log 2>/dev/null | cut -c1-220
    ;;
check)  # the final code: NVRAR's 2-rank sweep and a timed --quick tune (its validation pass)
    step test_nvrar_sweep2 100 python3 -m pytest -q -x -s tests/gpu/test_nvrar_gpu.py -k sweep_2
    step quick2 90 python3 benchmarks/tune_time.py --nproc-per-node 2 --only quick \
        --results "$W/tune_time_2gpu_quick.json" --keep "$W/q2"
    ;;
esac
cat "$W/steps.txt"
grep -h -A12 "^NVRAR vs NCCL\|^one-shot waits\|^one-shot protocols" "$W/dev2.log" 2>/dev/null
grep -h -A6 "^one-shot breakdown" "$W/diag2.log" 2>/dev/null
[ -f "$W/allreduce_2gpu.md" ] && cat "$W/allreduce_2gpu.md"
grep -h "passed\|failed\|error" "$W"/test_*.log 2>/dev/null | tail -8
for f in "$W"/tune_time_*.json; do
    [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); [print(r['kind'], r['wall_s'], 's rc', r['returncode'], r.get('measurements'), r.get('validation_within'), '/', r.get('validation_points'), r.get('seconds_by_phase')) for r in d['runs']]" "$f"
done
ls "$OUT"
