#!/usr/bin/env bash
# `artune launch` against a real SGLang 0.5.17 server on the GPU machine (issue #4's launcher):
# refusals, health, generate, the plugin's routes, SIGTERM (benchmarks/launch_check.py).
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session_launch.sh artune/profiles/<id>.json [TP]
#
# One server start (~80-90 s on a fresh machine); the report comes back in $OUT.
set -uo pipefail
PROFILE=${1:?usage: gpu_session_launch.sh PROFILE [TP]}
TP=${2:-2}
source benchmarks/sglang_site.sh
timeout -k 10 480 python3 benchmarks/launch_check.py --tp "$TP" --profile "$PROFILE" \
    --out "$OUT/launch_check_tp${TP}.md" 2>&1 | tail -n 30
