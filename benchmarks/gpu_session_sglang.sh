#!/usr/bin/env bash
# The SGLang end-to-end GPU call (issue #4), after gpu_session.sh produced and committed a profile.
#
#   device run, carry [".devwhl"]:  bash benchmarks/gpu_session_sglang.sh artune/profiles/<id>.json [TP]
#   engines side by side, reps in turn (sglang_e2e.py --paired; two: ~270-360 s a call warm):
#                                   PAIRED=default,artune bash benchmarks/gpu_session_sglang.sh ...
#
# One engine per config and subprocess (~60-80 s each on a fresh machine, more with
# torch.compile): TP=4 with five configs needs about 8 minutes. The configs run in one call,
# in the order that answers the targets first (default, NCCL-only, artune with SGLang's custom
# all-reduce off, then artune and artune + torch.compile), under one deadline (BUDGET_S seconds
# from the start, default 570: the device's limit is 600 per command). The script rewrites the
# JSON in $OUT after every config, so what is done when the deadline hits comes back; the
# summary is printed at the end (the JSON's "summary").
set -uo pipefail
PROFILE=${1:?usage: gpu_session_sglang.sh PROFILE [TP]}
TP=${2:-4}
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-570}
source benchmarks/sglang_site.sh
# The profile must describe this machine (a call may land on H200s where the profile came from
# H100s): if it does not, a quick tune of this machine makes one first (~70 s of the budget).
if ! python3 -c "import sys; from artune import profile as P, topology as T; \
p = P.load(sys.argv[1]); e, _ = T.compare(p.fingerprint, T.fingerprint($TP, $TP, device='cuda')); \
print('; '.join(e) or 'profile matches this machine'); sys.exit(1 if e else 0)" "$PROFILE"; then
    echo "tuning this machine first (--quick)"
    PROFILE=/tmp/artune-e2e-profile.json
    rm -f "$PROFILE" "$PROFILE".optuna.db*
    timeout -k 10 150 python3 -m artune.cli tune --nproc-per-node "$TP" --quick --out "$PROFILE" \
        > "$OUT/e2e_quick_tune.log" 2>&1 || { echo "quick tune failed"; tail -20 "$OUT/e2e_quick_tune.log"; }
    [ -f "$PROFILE" ] || exit 1
fi
# TAG=NAME names this run's files ..._NAME, so that two runs in one call keep theirs apart (at
# most 8 files come back from $OUT: the 27th session lost one of two pairs' results to that).
R="$OUT/sglang_e2e_tp${TP}${TAG:+_$TAG}.json"
LOG="$OUT/sglang_e2e${TAG:+_$TAG}.log"
# Anything still on the GPUs (e.g. the engines of a killed earlier call on a warm machine) would
# slow the engines timed here: name it in the log.
echo "processes on the GPUs before the engines start:"
BEFORE=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader \
    | sed 's/^/  /')
echo "${BEFORE:-  (none)}"  # a file in $OUT only when there is something to name
[ -n "$BEFORE" ] && echo "$BEFORE" > "$OUT/gpu_processes_before${TAG:+_$TAG}.txt"
LEFT=$(( BUDGET_S - ($(date +%s) - T0) ))
[ "$LEFT" -gt 120 ] || { echo "only ${LEFT} s left after the installs"; exit 1; }
# The script kills a worker at its own deadline (keeping its finished batch sizes); timeout is
# the backstop.
# CONFIGS picks configs; MERGE=FILE starts from an earlier results file (its configs are kept).
# PAIRED=A,B[,...] runs those configs' engines side by side, one rep from each in turn (REPS
# rounds per batch size, default 30 for two engines: 10 left two slow reps setting the
# interval on 4x H100; 20 for more), instead of CONFIGS one after another.
# PAIRED=default,artune,default_again,artune_again gives two engines of each config: on a fresh
# 4x H100 machine one call held bs 1 and 4 and 6 rounds of bs 16 (2026-11-27), so give such a
# call BATCH_SIZES=1,4 and the next 16,64. BATCH_SIZES (default 1,4,16,64) also trims a
# compiled run to fit. PROFILE_BS=4 (paired mode): after the check, each engine's decode-graph
# kernels at that batch size under SGLang's profiler, compared pair by pair in the summary
# (benchmarks/kernel_table.py; ~10-30 s per engine).
[ -n "${MERGE:-}" ] && cp "$MERGE" "$R"
MODE=(--configs "${CONFIGS:-default,nccl,artune_nccl,artune,artune_compile}")
if [ -n "${PAIRED:-}" ]; then
    ENGINES=$(( $(tr -cd , <<< "$PAIRED" | wc -c) + 1 ))
    MODE=(--paired "$PAIRED" --reps "${REPS:-$([ "$ENGINES" -gt 2 ] && echo 20 || echo 30)}")
fi
timeout -k 10 $(( LEFT + 15 )) python3 benchmarks/sglang_e2e.py --tp "$TP" --profile "$PROFILE" \
    "${MODE[@]}" --batch-sizes "${BATCH_SIZES:-1,4,16,64}" ${PROFILE_BS:+--profile-bs "$PROFILE_BS"} \
    --timeout "${TIMEOUT_S:-240}" --budget-s "$LEFT" --out "$R" 2>&1 | tee "$LOG"
echo "exit ${PIPESTATUS[0]} after $(( $(date +%s) - T0 )) s (full log: $LOG)"
python3 -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1])).get('summary', [])))" \
    "$R" 2>/dev/null || echo "no results in $R"
