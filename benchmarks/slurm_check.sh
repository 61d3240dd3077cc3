#!/usr/bin/env bash
# `artune tune` under a real Slurm (any cluster, or benchmarks/slurm_local.sh's one node), on
# CPU ranks (--device cpu, gloo): what artune/autotune/slurm.py reads from srun, end to end.
#
#   bash benchmarks/slurm_check.sh [OUTDIR]      # prints a table; logs under OUTDIR
#
# 1. srun -n 2: the step's two tasks are the tune's two ranks (one tune, world size 2);
# 2. srun -n 1: a step of one task launches its own ranks, as from a shell;
# 3. sbatch: two 2-task steps at once in one job (each its own rendezvous port) and a tune
#    from the batch script itself;
# 4. srun -n 2 with task 1, then task 0, SIGKILLed mid-tune: the survivor's error names the
#    dead rank within a bound, and `--resume` finishes the tune;
# 5. where the partition has two nodes or more (benchmarks/slurm_local.sh with NODES=2
#    emulates them on one machine): srun -N 2 --ntasks-per-node 2 is one tune of 2 nodes x 2
#    ranks; -N 2 -n 3 (tasks uneven over the nodes) is refused with exit 2; the last task of
#    the second node SIGKILLed mid-tune is named by the others, and --resume finishes.
set -uo pipefail
D=${1:-/tmp/artune-slurm-check}
if [ -d "$D" ] && [ -n "$(ls -A "$D")" ] && [ ! -f "$D/.artune-slurm-check" ]; then
    echo "$D exists and is not an earlier slurm_check.sh folder: name another" >&2; exit 2
fi
rm -rf "$D"; mkdir -p "$D" && touch "$D/.artune-slurm-check"; cd "$D" || exit 1
ROWS=()
row() { ROWS+=("| $1 | $2 | $3 |"); }
secs() { python3 -c "import time,sys; print(round(time.time()-float(sys.argv[1]),1))" "$1"; }
world() { python3 -c "import json,sys; t=json.load(open(sys.argv[1]))['fingerprint']['topology']; \
print(t['world_size'], 'ranks,', t['nodes'], 'node(s)')" "$1" 2>/dev/null || echo "no profile"; }

T=$(date +%s.%N); srun -N 1 -n 2 --cpus-per-task 1 artune tune --device cpu --quick --out "$D/s2.json" > s2.log 2>&1
rc=$?; n=$(grep -c "^artune tune: 2 ranks" s2.log)
row "srun -N 1 -n 2 --quick" "exit $rc, $(secs "$T") s, $(world "$D/s2.json"), tune banners: $n" \
    "$([ $rc = 0 ] && [ "$n" = 1 ] && echo pass || echo FAIL)"

T=$(date +%s.%N); srun -N 1 -n 1 artune tune --device cpu --quick --out "$D/s1.json" > s1.log 2>&1
rc=$?; starts=$(grep -c "start ranks" s1.log)
row "srun -N 1 -n 1 --quick (launches its own ranks)" "exit $rc, $(secs "$T") s, $(world "$D/s1.json"), 'start ranks' in set-up: $starts" \
    "$([ $rc = 0 ] && [ "$starts" -ge 1 ] && echo pass || echo FAIL)"

cat > job.sh <<JOB
#!/bin/bash
#SBATCH -N 1 -n 4
#SBATCH -o $D/job.out
cd $D
srun -n 2 --exact --cpus-per-task 1 artune tune --device cpu --quick --out $D/ja.json > ja.log 2>&1 &
A=\$!
srun -n 2 --exact --cpus-per-task 1 artune tune --device cpu --quick --dtypes float32 --out $D/jb.json > jb.log 2>&1 &
B=\$!
wait \$A; echo "a \$?"; wait \$B; echo "b \$?"
artune tune --device cpu --quick --out $D/jc.json > jc.log 2>&1; echo "c \$?"
JOB
T=$(date +%s.%N); sbatch --wait job.sh > sbatch.log 2>&1
codes=$(tr '\n' ' ' < job.out 2>/dev/null)
overlap=$(python3 - "$D" <<'PY'
import json, sys
from datetime import datetime
def span(f):
    p = json.load(open(f"{sys.argv[1]}/{f}.json"))
    end = datetime.fromisoformat(p["created"].replace("Z", "+00:00")).timestamp()
    return end - p["tune_seconds"]["total"], end
try:
    (a0, a1), (b0, b1) = span("ja"), span("jb")
    print(f"steps overlapped {max(0.0, min(a1, b1) - max(a0, b0)):.1f} s")
except Exception as exc:
    print(f"no overlap measured ({exc})")
PY
)
row "sbatch: two 2-task steps at once + a tune in the batch script" "$codes; $(secs "$T") s; $overlap" \
    "$([ "$codes" = "a 0 b 0 c 0 " ] && echo pass || echo FAIL)"

# kill_case LABEL VICTIM WANT SRUN_ARGS...: the step with task VICTIM SIGKILLed after 8 s, then
# --resume; passes when a survivor's error contains WANT and the resume finishes.
kill_case() {
    local label=$1 victim=$2 want=$3; shift 3
    local out="$D/$label.json" T rc t says rc2 kept
    T=$(date +%s.%N)
    srun "$@" bash -c "if [ \"\$SLURM_PROCID\" = $victim ]; then (sleep 8; kill -9 \$\$) & fi; \
exec artune tune --device cpu --out $out" > "$label.log" 2>&1
    rc=$?; t=$(secs "$T")
    says=$(sed -n 's/.*\(artune tune: rank [0-9]*: .* failed: .*\) (bound:.*/\1/p' "$label.log" | head -1)
    T=$(date +%s.%N); srun "$@" artune tune --device cpu --out "$out" --resume > "${label}_resume.log" 2>&1
    rc2=$?; kept=$(grep -o "[0-9]* measurements and [0-9]* exclusions kept" "${label}_resume.log")
    row "srun $*, task $victim SIGKILLed after 8 s; then --resume" \
        "step exit $rc after $t s: \"$says\"; resume exit $rc2 ($kept, $(secs "$T") s)" \
        "$([ $rc != 0 ] && [[ "$says" == *"$want"* ]] && [ $rc2 = 0 ] && \
            [ "${kept%% *}" -gt 0 ] 2>/dev/null && echo pass || echo FAIL)"
}
kill_case k1 1 "rank(s) 1 stopped" -N 1 -n 2 --cpus-per-task 1
kill_case k0 0 "rank 0 (or the launcher) died" -N 1 -n 2 --cpus-per-task 1

if [ "$(sinfo -N -h -o %N 2>/dev/null | sort -u | wc -l)" -ge 2 ]; then
    T=$(date +%s.%N); srun -N 2 --ntasks-per-node 2 artune tune --device cpu --quick --out "$D/m4.json" > m4.log 2>&1
    rc=$?; n=$(grep -c "^artune tune: 4 ranks" m4.log)
    row "srun -N 2 --ntasks-per-node 2 --quick" "exit $rc, $(secs "$T") s, $(world "$D/m4.json"), tune banners: $n" \
        "$([ $rc = 0 ] && [ "$n" = 1 ] && [ "$(world "$D/m4.json")" = "4 ranks, 2 node(s)" ] && echo pass || echo FAIL)"
    srun -N 2 -n 3 artune tune --device cpu --quick --out "$D/m3.json" > m3.log 2>&1
    rc=$?; says=$(grep -o "the step runs .* tasks on its nodes" m3.log | head -1)
    row "srun -N 2 -n 3 (uneven over the nodes)" "exit $rc: \"$says\"; profile written: $([ -f "$D/m3.json" ] && echo yes || echo no)" \
        "$([ $rc = 2 ] && [ -n "$says" ] && [ ! -f "$D/m3.json" ] && echo pass || echo FAIL)"
    kill_case m4k 3 "rank(s) 3 stopped" -N 2 --ntasks-per-node 2
else
    row "several nodes" "the partition has one node: not run (NODES=2 bash benchmarks/slurm_local.sh)" "-"
fi

echo "artune under Slurm $(sinfo --version 2>/dev/null | awk '{print $2}'), $(date -u +%FT%TZ), $(nproc) CPUs"
echo "| case | what happened | |"
echo "|---|---|---|"
printf '%s\n' "${ROWS[@]}"
