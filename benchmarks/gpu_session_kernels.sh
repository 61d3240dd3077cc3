#!/usr/bin/env bash
# Kernel traces of served decode steps (benchmarks/sglang_kernels.py) on every GPU of the machine
# (TP = the GPU count, 2 or 4, with the machine's reference profile): SGLang's default, artune
# with SGLang's custom all-reduce off (NVRAR on the decode all-reduces) and NCCL only, one engine
# each, CONFIGS and BATCH_SIZES to change them. Where does NVRAR's extra 1-3 µs per all-reduce
# in the served model go (nineteenth session: level with SGLang's own between GEMMs)?
#
#   device run, carry [".devwhl"], kind nvidia-h100-x4 or -x2:  bash benchmarks/gpu_session_kernels.sh
# Twentieth session, 4x H100: 255 s warm (gpu_session_2026-11-27h.md).
set -uo pipefail
W=/tmp/artune-gpu-kernels
source benchmarks/gpu_lib.sh
source benchmarks/sglang_site.sh
N=$(nvidia-smi -L | wc -l)
PROF=$(reference_profile) || exit 1
timeout -k 10 570 python3 benchmarks/sglang_kernels.py --tp "$N" --profile "$PROF" \
    --configs "${CONFIGS:-default,artune_nccl,nccl}" --batch-sizes "${BATCH_SIZES:-1,16}" \
    --steps "${STEPS:-32}" --out "$OUT/kernels_tp$N.json" 2>&1 | tee "$OUT/kernels.log" \
    | grep -v "Ignore import error\|UserWarning\|warn_once" | tail -80
