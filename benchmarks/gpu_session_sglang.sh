#!/usr/bin/env bash
# The SGLang end-to-end GPU call (issue #4), after gpu_session.sh produced and committed a profile.
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session_sglang.sh artune/profiles/<id>.json [TP]
#
# One engine per config and subprocess (~60-80 s each on a fresh machine): TP=4 with five configs
# needs about 7 minutes, so this runs the three that answer the targets first (default, NCCL-only,
# artune with SGLang's custom all-reduce off), then artune and artune + torch.compile. Results
# merge into one JSON in $OUT (the script keeps configs already in the file).
set -uo pipefail
PROFILE=${1:?usage: gpu_session_sglang.sh PROFILE [TP]}
TP=${2:-4}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 SGLANG_IS_FLASHINFER_AVAILABLE=false
OUT=${OUT:-/tmp/artune-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .devwhl/*.whl || exit 1
# artune's entry point (sglang.srt.plugins) must be visible to SGLang's plugin loader.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site
R="$OUT/sglang_e2e_tp${TP}.json"
for configs in default,nccl,artune_nccl artune,artune_compile; do
    timeout -k 10 300 python3 benchmarks/sglang_e2e.py --tp "$TP" --profile "$PROFILE" \
        --configs "$configs" --batch-sizes 1,4,16,64 --out "$R" 2>&1 | tail -40
done
