# Sourced by the GPU-machine scripts: environment, wheel install, and `step` (a time-limited,
# logged command whose result is copied to $OUT at once, so a call cut short still returns it).
# Needs: W (work folder), OUT. .devwhl holds the wheels the machine lacks: the SGLang 0.5.17 test
# set of ../shared/device-sglang, optuna (+ alembic, sqlalchemy, colorlog, mako), nvshmem4py-cu13
# 0.4.1, cuda-python 13.3.1, and what sglang.launch_server's HTTP server imports beyond the
# Engine API (jsonschema + jsonschema-specifications, referencing, rpds-py; python-multipart;
# soundfile + cffi, pycparser); and, in place of the wheel set's flashinfer stub (only
# flashinfer.sampling), sglang_smoke_stub_flashinfer 0.0.2: any other submodule imports (the
# HTTP server imports flashinfer.prefill), except those SGLang and sgl_kernel probe with
# try/except import to pick a kernel (norm, comm, fused_moe, gemm, ...); every use raises.
# The Engine runs (tunes, allreduce.py, the pairs) need only the wheel set's own stub and none
# of the HTTP server's wheels; since the 28th session the full set no longer fits a call's
# 64 MiB beside the tree, so carry the HTTP server's wheels for a launch call only; since the
# 30th session (tree ~10.5 MB) the optuna set (optuna, alembic, sqlalchemy, colorlog, mako: 5.5
# MB) does not fit beside the rest either: carry it for a call that tunes, not for the pairs,
# allreduce.py or the GPU tests, which do not import optuna. The SGLang candidate of a tune
# needs openai (sglang imports it): a tune call that leaves it out to fit measures no SGLang.
# The HTTP server's flashinfer stub: `python benchmarks/make_flashinfer_stub.py .devwhl`.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 SGLANG_IS_FLASHINFER_AVAILABLE=false
OUT=${OUT:-/tmp/artune-out}   # gets at most 8 files back: the work happens in $W
rm -rf "$W"; mkdir -p "$OUT" "$W"
T0=$(date +%s)
# A warm machine keeps /tmp/site from an earlier script; the marker names the wheels installed
# there, so that a call carrying another set (the optuna set for a tune, the HTTP server's for
# a launch) installs it (31st session: a tune after a launch call found no optuna).
WHEELS=$(cd .devwhl && ls *.whl | sort | tr '\n' ' ')
if [ "$(cat /tmp/site/.artune-installed 2>/dev/null)" != "$WHEELS" ]; then
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .devwhl/*.whl || exit 1
# Byte-compile as a normal pip install does (otherwise the first, timed tune pays for it).
python3 -m compileall -q -j 16 /tmp/site > /dev/null 2>&1
echo "$WHEELS" > /tmp/site/.artune-installed
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$W/card.txt"
card_slug() {  # the card's model for file names: h100, h200, ... (gpu where none is found)
    local m
    m=$(grep -o 'H[0-9][0-9][0-9]' "$W/card.txt" | head -1 | tr 'A-Z' 'a-z')
    echo "${m:-gpu}"
}

reference_profile() {  # the profile of this machine: a committed one of this card and GPU
    # count, else one tuned by an earlier call on this warm machine (/tmp/artune-tuned-<N>gpu.json),
    # else (status 1) a committed one of this GPU count, which gpu_session_sglang.sh replaces by a
    # quick tune of this machine
    local n name f
    n=$(nvidia-smi -L | wc -l)
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    for f in artune/profiles/*.json "/tmp/artune-tuned-${n}gpu.json"; do
        [ -f "$f" ] && python3 -c "import json, sys; t = json.load(open(sys.argv[1]))['fingerprint']['topology']
sys.exit(0 if (t['world_size'], t['gpu']) == (int(sys.argv[2]), sys.argv[3]) else 1)" \
            "$f" "$n" "$name" && { echo "$f"; return 0; }
    done
    echo "no profile of $n x $name here" >&2
    case "$n" in
        4) echo artune/profiles/6eeb601b655cf21c.json ;;
        2) echo artune/profiles/4b6998f7355af1ed.json ;;
    esac
    return 1
}
step() {  # step NAME LIMIT_S CMD...: run with a time limit, log to $W/NAME.log, note the result
    local name=$1 limit=$2; shift 2
    local t=$(date +%s)
    timeout -k 10 "$limit" "$@" >"$W/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t ))s (at $(( $(date +%s) - T0 ))s)" | tee -a "$W/steps.txt"
    cat "$W/card.txt" "$W/steps.txt" > "$OUT/steps-${W##*/}.txt"
    cp "$W"/tune_time_*.json "$W"/*.md "$W"/*.json "$OUT"/ 2>/dev/null
    tar czf "$OUT/logs-${W##*/}.tgz" --exclude='triton-cache-*' --exclude='*.db' -C "$W" . \
        2>/dev/null
}
