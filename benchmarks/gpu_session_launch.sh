#!/usr/bin/env bash
# `artune launch` against a real SGLang 0.5.17 server on the GPU machine (issue #4's launcher):
# refusals, health, generate, the plugin's routes, SIGTERM (benchmarks/launch_check.py).
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session_launch.sh [PROFILE] [TP]
#
# PROFILE defaults to the reference profile whose fingerprint is this machine's with TP ranks
# (artune/profiles/<id>.json, as `artune launch` computes it; a `--quick` tune makes one where
# there is none); TP defaults to every GPU.
# One server start (75 s, and 159 s the first time on a fresh 2x H100 machine, eleventh
# session); the report and the server's log come back in $OUT as the checks run.
set -uo pipefail
source benchmarks/sglang_site.sh
TP=${2:-$(nvidia-smi -L | wc -l)}
PROFILE=${1:-artune/profiles/$(python3 -c "from artune import topology as t; \
print(t.fingerprint_id(t.fingerprint($TP, $TP)))").json}
if [ ! -f "$PROFILE" ]; then  # a machine no reference profile was made on: tune one first
    echo "no profile $PROFILE for this machine at TP=$TP: a --quick tune makes one"
    PROFILE=/tmp/artune-launch-profile.json
    rm -f "$PROFILE" "$PROFILE.optuna.db"
    timeout -k 10 200 python3 -m artune.cli tune --nproc-per-node "$TP" --quick --out "$PROFILE" \
        > "$OUT/launch_tune.log" 2>&1 || { tail -n 20 "$OUT/launch_tune.log"; exit 1; }
fi
# launch_server imports more than the Engine API (its HTTP server: jsonschema, soundfile,
# python-multipart, all in .devwhl): fail here in seconds, not after the refusal checks
python3 -c "import sglang.srt.entrypoints.http_server" || exit 1
timeout -k 10 500 python3 benchmarks/launch_check.py --tp "$TP" --profile "$PROFILE" \
    --out "$OUT/launch_check_tp${TP}.md" 2>&1 | tail -n 40
