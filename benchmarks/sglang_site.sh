# Sourced by the SGLang GPU scripts (gpu_session_sglang.sh, gpu_session_launch.sh): the
# environment SGLang 0.5.17's test wheel set needs on the GPU machines (../shared/device-sglang),
# those wheels in /tmp/site, and artune installed there so that SGLang's plugin loader sees its
# sglang.srt.plugins entry point. Needs OUT.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 SGLANG_IS_FLASHINFER_AVAILABLE=false
# As ../shared/device-sglang/smoke.py (which ran there): no network, JIT builds need nvcc + ninja.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
export PATH="$(dirname "$(command -v python3)"):$PATH"
OUT=${OUT:-/tmp/artune-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .devwhl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
# artune's entry point (sglang.srt.plugins) must be visible to SGLang's plugin loader
# (importlib.metadata). A pip build needs setuptools on the machine; without it, write the
# metadata by hand (artune itself is imported from $PWD).
rm -rf /tmp/site/artune /tmp/site/artune-*.dist-info /tmp/site/artune-*.egg-info
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade \
        --target /tmp/site . ; then
    echo "pip could not build artune: writing its entry-point metadata by hand"
    D=/tmp/site/artune-0.1.0.dist-info
    mkdir -p "$D"
    printf 'Metadata-Version: 2.1\nName: artune\nVersion: 0.1.0\n' > "$D/METADATA"
    printf '[sglang.srt.plugins]\nartune = artune.integration.sglang:register\n' \
        > "$D/entry_points.txt"
fi
python3 -c "from importlib.metadata import entry_points as e; \
import sys; sys.exit(0 if any(p.name == 'artune' for p in e(group='sglang.srt.plugins')) else 1)" \
    || { echo "artune's sglang.srt.plugins entry point is not visible"; exit 1; }
