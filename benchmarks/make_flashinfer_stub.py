"""Build the catch-all flashinfer test stub that `python -m sglang.launch_server` needs on the
GPU machines (test equipment for benchmarks/gpu_session_launch.sh; not part of artune).

    python benchmarks/make_flashinfer_stub.py DIR

writes DIR/sglang_smoke_stub_flashinfer-0.0.2-py3-none-any.whl.

The GPU machines' SGLang wheel set (../shared/device-sglang) has a flashinfer stand-in with
`flashinfer.sampling` only, enough for the Engine API. SGLang 0.5.17's HTTP server also imports
`flashinfer.prefill` at module level (through its vision attention, `if _is_cuda:`), so this stub
makes every `flashinfer.<sub>` import succeed with functions that raise when called, except the
submodules SGLang and sgl_kernel import inside `try:` to choose a kernel (found by scanning both
for flashinfer imports under a `try`): those stay missing, so that each probe falls back to its
non-flashinfer kernel (the eleventh session saw sgl_kernel pick flashinfer's RMSNorm when
`flashinfer.norm` imported, and the server die capturing its graphs). `from flashinfer import X`
stays an ImportError for anything but the two names the wheel set's stub has, for the same reason.
Use it with SGLANG_IS_FLASHINFER_AVAILABLE=false, as the wheel set's stub.
"""

from __future__ import annotations

import base64
import hashlib
import sys
import zipfile
from pathlib import Path

NAME, VERSION = "sglang_smoke_stub_flashinfer", "0.0.2"

#: Submodules imported inside `try:` by SGLang 0.5.17 or sgl_kernel 0.4.5 to pick a kernel, and
#: the names they import from the package inside `try:` (`from flashinfer import X` falls back
#: to importing a submodule X, which the finder would otherwise make).
PROBED = ("comm", "decode", "fused_moe", "gdn_decode", "gdn_kernels", "gdn_prefill", "gemm",
          "kda_decode", "mamba", "norm", "ActivationType", "CuteDslMoEWrapper",
          "nvfp4_block_scale_interleave", "reorder_rows_for_gated_act_gemm", "shuffle_matrix_sf_a")

INIT = f'''"""Import-only stand-in for flashinfer (NOT the real package; {NAME} {VERSION}).

Every flashinfer.<sub> import succeeds with functions that raise when called, except the
submodules SGLang and sgl_kernel probe to pick a kernel: {", ".join(PROBED)}.
Use with SGLANG_IS_FLASHINFER_AVAILABLE=false, attention_backend='triton',
sampling_backend='pytorch'.
"""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+sglang-smoke-stub-catch-all"
_PROBED = {PROBED!r}


def _unavailable(name):
    def fn(*args, **kwargs):
        raise RuntimeError(
            f"flashinfer.{{name}} called, but only a test stub of flashinfer is installed "
            "(attention_backend='triton', sampling_backend='pytorch', "
            "SGLANG_IS_FLASHINFER_AVAILABLE=false)")
    fn.__name__ = name.rsplit(".", 1)[-1]
    return fn


bmm_fp8 = _unavailable("bmm_fp8")


class _Stub(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _unavailable(f"{{self.__name__[len('flashinfer.'):]}}.{{attr}}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        parts = fullname.split(".")
        if parts[0] != "flashinfer" or len(parts) < 2 or parts[1] in _PROBED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        mod = _Stub(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        pass


if not any(isinstance(f, _StubFinder) or type(f).__name__ == "_StubFinder"
           and getattr(f, "__module__", "") == __name__ for f in sys.meta_path):
    sys.meta_path.append(_StubFinder())
'''

SAMPLING = '''"""Stand-in for flashinfer.sampling (functions raise: sampling_backend='pytorch')."""
from flashinfer import _unavailable

min_p_sampling_from_probs = _unavailable("sampling.min_p_sampling_from_probs")
top_k_top_p_sampling_from_probs = _unavailable("sampling.top_k_top_p_sampling_from_probs")
'''


def build(out_dir: Path) -> Path:
    dist = f"{NAME}-{VERSION}.dist-info"
    files = {
        "flashinfer/__init__.py": INIT,
        "flashinfer/sampling.py": SAMPLING,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: artune-benchmarks\n"
                         "Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}/top_level.txt": "flashinfer\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    whl = out_dir / f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w", zipfile.ZIP_DEFLATED) as z:
        for path, text in files.items():
            z.writestr(path, text)
    return whl


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    print(build(Path(sys.argv[1])))
