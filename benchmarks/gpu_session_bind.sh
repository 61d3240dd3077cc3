#!/usr/bin/env bash
# One 4-GPU call: what preparing each backend's call per message shape (Backend.bind) does to
# eager all-reduces (issue #2's eager validation misses), old code beside new on one machine.
#
#   device run, carry [".devwhl", ".old"]:  bash benchmarks/gpu_session_bind.sh
#   VERIFY=1 (carry [".devwhl"]): the new code only: a full tune with the validation controls
#   (its profile and `artune show`), a --quick tune as users run it, the 2-GPU tune test.
#   E2E=1 PAIRED=A,B (carry [".devwhl"]): the full tune with controls, then SGLang's engines
#   side by side with its profile (gpu_session_sglang.sh) in what is left of 585 s; or
#   TWO=1 (carry [".devwhl"], kind nvidia-h100-x2): a full 2-GPU tune with the controls.
#   E2E=PROFILE: that profile (with ALSO_TUNE=1 the tune still runs first, its profile unused).
#
# .old: the package and benchmarks/router_eager.py of the commit before (git archive REV artune
# benchmarks/router_eager.py | tar -x -C .old; .old is in .git/info/exclude). Steps: routed vs
# direct eager calls (router_eager.py) with the old and the new code in turns (one-shot
# twice, two-shot once); the
# backends' GPU tests; a full tune with the validation controls, and `artune show` of it.
set -uo pipefail
W=/tmp/artune-gpu-bind
source benchmarks/gpu_lib.sh
if [ -n "${TWO:-}" ]; then
    ARTUNE_VALIDATE_CONTROLS=1 step tune2 150 python3 benchmarks/tune_time.py \
        --nproc-per-node 2 --only full --results "$W/tune_time_full_2gpu.json" --keep "$W/t2"
    [ -f "$W/t2/full.json" ] && cp "$W/t2/full.json" "$OUT/profile_full_2gpu.json" && \
        python3 -m artune.cli show "$W/t2/full.json" > "$OUT/profile_full_2gpu_show.txt" 2>&1
    cat "$W/steps.txt"
    grep -h "tune time\|validation\|routed .* vs" "$OUT/profile_full_2gpu_show.txt" | head -12
    exit 0
fi
if [ -n "${E2E:-}" ]; then
    PROF=$E2E
    if [ "$E2E" = 1 ] || [ -n "${ALSO_TUNE:-}" ]; then
        ARTUNE_VALIDATE_CONTROLS=1 step tune4 200 python3 benchmarks/tune_time.py \
            --nproc-per-node 4 --only full --results "$W/tune_time_full_4gpu.json" --keep "$W/t4"
        T=$W/t4/full.json
        [ "$E2E" = 1 ] && PROF=$T
        [ -f "$T" ] || { cat "$W/steps.txt"; tail -30 "$W/tune4.log"; exit 1; }
        cp "$T" "$OUT/profile_full_4gpu.json"
        python3 -m artune.cli show "$T" > "$OUT/profile_full_4gpu_show.txt" 2>&1
        grep -h "tune time\|validation\|routed .* vs" "$OUT/profile_full_4gpu_show.txt" | head -12
    fi
    BUDGET_S=$(( 585 - ($(date +%s) - T0) )) bash benchmarks/gpu_session_sglang.sh "$PROF" 4
    exit 0
fi
if [ -n "${VERIFY:-}" ]; then
    ARTUNE_VALIDATE_CONTROLS=1 step tune4 240 python3 benchmarks/tune_time.py \
        --nproc-per-node 4 --only full --results "$W/tune_time_full_4gpu.json" --keep "$W/t4"
    [ -f "$W/t4/full.json" ] && cp "$W/t4/full.json" "$OUT/profile_full_4gpu.json" && \
        python3 -m artune.cli show "$W/t4/full.json" > "$OUT/profile_full_4gpu_show.txt" 2>&1
    step quick4 90 python3 benchmarks/tune_time.py --nproc-per-node 4 --only quick \
        --results "$W/tune_time_quick_4gpu.json" --keep "$W/q4"
    CUDA_VISIBLE_DEVICES=0,1 step test_tune_gpu 120 python3 -m pytest -q -x tests/test_tune_gpu.py
    cat "$W/steps.txt"
    grep -h "passed\|failed" "$W/test_tune_gpu.log" | tail -2
    grep -h "tune time\|validation\|routed .* vs" "$OUT/profile_full_4gpu_show.txt" | head -20
    grep -h "tune time\|validation:" "$W/quick4.log" | head -4
    exit 0
fi
R=benchmarks/router_eager.py
for turn in 1 2; do
    for code in old new; do
        root=.; [ $code = old ] && root=.old
        step "eager_${code}_one_$turn" 60 torchrun --nproc-per-node 4 $root/$R \
            --backend symm_one_shot --sizes 4K,64K,1M --out "$W/router_eager_${code}_one_$turn.md"
        [ $turn = 1 ] && step "eager_${code}_two_$turn" 60 torchrun --nproc-per-node 4 $root/$R \
            --backend symm_two_shot --sizes 4M,6M --out "$W/router_eager_${code}_two_$turn.md"
    done
done
step test_backends 150 python3 -m pytest -q -x tests/gpu/test_backends_gpu.py
ARTUNE_VALIDATE_CONTROLS=1 step tune4 240 python3 benchmarks/tune_time.py --nproc-per-node 4 \
    --only full --results "$W/tune_time_bind_4gpu.json" --keep "$W/t4"
[ -f "$W/t4/full.json" ] && cp "$W/t4/full.json" "$OUT/profile_bind_4gpu.json" && \
    python3 -m artune.cli show "$W/t4/full.json" > "$OUT/profile_bind_4gpu_show.txt" 2>&1
cat "$W/steps.txt"
for f in "$W"/router_eager_*.md; do echo "== ${f##*/}"; grep "^|" "$f" | tail -n +3; done
grep -h "passed\|failed" "$W/test_backends.log" | tail -3
grep -h "validation\|routed .* vs" "$OUT/profile_bind_4gpu_show.txt" 2>/dev/null | head -30
