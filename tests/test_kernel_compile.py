"""The kernels compile for Hopper (sm_90) through Triton's NVIDIA backend and ptxas, without a GPU.

The interpreter accepts code that the compiler rejects (e.g. a variable whose block shape differs
between the branches of an `if`), so CPU-only CI also compiles every kernel for the GPU, and checks
that the production configuration (16-bit, head dim 64) does not spill registers.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mip_dist.kernels import _backend  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(PTXAS), reason="triton's bundled ptxas is missing"),
    pytest.mark.skipif(_backend.interpreter_requested(),
                       reason="TRITON_INTERPRET=1 for the whole process: triton's own helpers are interpreted"),
]

TL_DTYPE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
POINTERS = {"Q", "K", "V", "BK", "BV", "IK", "IV", "O", "DO", "DQ", "DK", "DV", "DIK", "DIV"}
FP32_POINTERS = {"LSE", "DELTA", "DBK", "DBV"}  # always fp32 buffers


def signature(fn, dtype: str, constexprs: dict, fp32_out: set[str] = frozenset()) -> dict:
    """Triton signature from the kernel's argument names (pointers, int lengths/strides, fp32 scales)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name == "BIDX":
            sig[name] = "*i64"
        elif name in FP32_POINTERS or name in fp32_out:
            sig[name] = "*fp32"
        elif name in POINTERS:
            sig[name] = "*" + dtype
        elif name in ("qk_scale", "scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_sm90(kernel: str, dtype: torch.dtype, d: int, lengths=(211, 211, 16, 16), **flags):
    """Compile one kernel ('fwd', 'delta', 'dq', 'kv') as the host code would launch it."""
    mod = _backend.kernel_module(torch.device("cuda"))
    q = torch.empty(1, dtype=dtype)
    n, s, pm, pi = lengths
    params = mod._launch_params("fwd" if kernel == "fwd" else ("kv" if kernel == "kv" else "dq"),
                                q, n, s, pm, pi, d)
    options = {"num_warps": params.pop("num_warps"), "num_stages": params.pop("num_stages")}
    fn = {"fwd": mod._fwd_kernel, "delta": mod._bwd_delta_kernel, "dq": mod._bwd_dq_kernel,
          "kv": mod._bwd_kv_kernel}[kernel]
    if kernel == "delta":
        params = {"BLOCK_M": params["BLOCK_M"], "BLOCK_D": d}
    else:
        params["BANK_SHARED"] = False  # the modality-prompt call: a per-sample bank index
    params.update(flags)
    fp32_out = {"DQ"} if flags.get("ATOMIC") else set()
    src = ASTSource(fn, signature(fn, TL_DTYPE[dtype], params, fp32_out), params)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def spills(compiled) -> int:
    """Spill-store bytes reported by ptxas -v for the kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run([PTXAS, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return int(re.search(r"(\d+) bytes spill stores", out).group(1))


KERNELS = [("fwd", {}), ("delta", {}), ("dq", {"ATOMIC": False}), ("dq", {"ATOMIC": True}),
           ("kv", {"BANK_ATOMIC": True}), ("kv", {"BANK_ATOMIC": False})]


@pytest.mark.parametrize("kernel, flags", KERNELS, ids=[f"{k}{''.join(f'-{n}{v}' for n, v in f.items())}"
                                                        for k, f in KERNELS])
def test_production_config_compiles_without_spills(kernel, flags):
    compiled = compile_sm90(kernel, torch.bfloat16, 64, **flags)
    assert spills(compiled) == 0, f"{kernel} {flags} spills registers on sm_90"


@pytest.mark.parametrize("dtype, d", [(torch.float16, 128), (torch.float32, 32), (torch.bfloat16, 16)])
def test_other_dtypes_and_head_dims_compile(dtype, d):
    for kernel, flags in (("fwd", {}), ("dq", {"ATOMIC": False}), ("kv", {"BANK_ATOMIC": True})):
        compile_sm90(kernel, dtype, d, lengths=(17, 3, 3, 0), **flags)
