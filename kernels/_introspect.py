"""Compile-time facts of the kernels for sm_90 without a GPU: registers, spills, shared memory, occupancy.

The launches are the ones the host code really makes: `forward` / `backward` of the compiled kernel
module run with its `@triton.jit` kernels replaced by recorders (nothing executes, CPU tensors laid
out like the model's), and each recorded launch is compiled through the JIT's own binder, so the
signature, the constexpr strides of 1 and the divisibility-by-16 hints are exactly those a GPU run
specialises on. `python -m mip_dist.kernels._introspect` prints the table kept in the kernel
module's docstring (tests/test_kernel_compile.py checks that the two agree); `--candidates` prints the
facts of every autotune candidate instead.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch

# sm_90 per-SM limits (the CUDA occupancy calculator's numbers for compute capability 9.0)
SM90_REGS = 65_536
SM90_SMEM = 228 * 1024
SM90_MAX_WARPS = 64
SM90_MAX_CTAS = 32
REG_UNIT = 256  # registers are allocated per warp in units of 256
WARP_UNIT = 4  # warps are allocated in groups of 4 against the register file
SMEM_UNIT = 128
SM90_SMS = 132  # H100 SXM: the one-pass backward's persistent grid is SMs x FUSED_CTAS_PER_SM
KERNELS = ("_fwd_kernel", "_bwd_fused_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel", "_bwd_kv_kernel")

# one prompted block of the paper's ViT-B: per-sample bank entry (2 modalities) and instance prompts
PAPER = dict(B=64, H=12, N=211, S=211, D=64, M=2, Pm=16, Pi=16, broadcast_q=False, indexed=True)
# IPG: 16 broadcast queries over 210 patches, the queries' own k/v as a one-entry bank with no index
IPG = dict(B=64, H=12, N=16, S=210, D=64, M=1, Pm=16, Pi=0, broadcast_q=True, indexed=False)
CASES = {"paper": PAPER, "ipg": IPG}


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the kernel, its grid and the exact arguments the host passed."""

    name: str
    fn: object
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JIT kernel: `kernel[grid](*args, **kwargs)` records (or drops) the launch."""

    def __init__(self, name: str, fn: object, sink: Optional[list]) -> None:
        self.name, self.fn, self.sink = name, fn, sink

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        if self.sink is None:
            return _noop
        return lambda *args, **kwargs: self.sink.append(Launch(self.name, self.fn, grid, args, kwargs))


def _noop(*args, **kwargs) -> None:
    """A launch that does nothing (host-overhead measurement)."""


@contextlib.contextmanager
def stub_kernels(module: ModuleType, sink: Optional[list] = None) -> Iterator[Optional[list]]:
    """Replace the module's kernels by recorders for the duration (launches go to `sink`, or nowhere)."""
    saved = {name: getattr(module, name) for name in KERNELS if hasattr(module, name)}  # older copies lack some
    try:
        for name, fn in saved.items():
            setattr(module, name, _Recorder(name, fn, sink))
        yield sink
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)


def model_layout(B: int, H: int, N: int, D: int, parts: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """`parts` [B, H, N, D] views of one [B, N, parts*H*D] projection, as the model's `_split` makes them."""
    t = torch.empty(B, N, parts * H * D, dtype=dtype)
    return t.reshape(B, N, parts, H, D).permute(2, 0, 3, 1, 4).unbind(0)


def case_inputs(c: dict, dtype: torch.dtype) -> tuple:
    """(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v) for a case dict, laid out like the model's."""
    B, H, N, S, D, M, Pm, Pi = (c[k] for k in ("B", "H", "N", "S", "D", "M", "Pm", "Pi"))
    if c["broadcast_q"]:  # IPG: q and the bank come from one projection of the queries
        q, bank_k, bank_v = model_layout(1, H, N, D, 3, dtype)
        k, v = model_layout(B, H, S, D, 2, dtype)
    else:
        q, k, v = model_layout(B, H, N, D, 3, dtype)
        bank_k, bank_v = model_layout(M, H, Pm, D, 2, dtype)
    inst_k, inst_v = model_layout(B, H, Pi, D, 2, dtype) if Pi else (None, None)
    bank_index = torch.arange(B) % M if c["indexed"] else None
    return q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v


def record_launches(module: ModuleType, case: str | dict, deterministic: bool = False,
                    dtype: torch.dtype = torch.bfloat16, fused: Optional[bool] = None) -> list[Launch]:
    """The launches of one forward + backward at a case shape ('paper', 'ipg' or a dict like PAPER);
    fused: the backward path (None: the one the host code picks)."""
    c = CASES[case] if isinstance(case, str) else case
    x = case_inputs(c, dtype)
    launches: list[Launch] = []
    scale = c["D"] ** -0.5
    slots = module._slots
    module._slots = lambda device: SM90_SMS * module.FUSED_CTAS_PER_SM  # the grid an H100 gets
    try:
        with stub_kernels(module, launches):
            o, lse = module.forward(*x, scale, deterministic)
            module.backward(torch.empty_like(o), *x, o, lse, scale, deterministic, fused=fused)
    finally:
        module._slots = slots
    return launches


def compile_launch(launch: Launch, capability: int = 90):
    """Compile a recorded launch for `sm_<capability>` with the JIT's own argument specialization."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _nvidia_tool(name: str) -> str:
    """Path of a tool bundled with triton's NVIDIA backend (ptxas, cuobjdump)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _cuobjdump(compiled, flag: str) -> str:
    """cuobjdump `flag` output for the compiled cubin."""
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        return subprocess.run([_nvidia_tool("cuobjdump"), flag, f.name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(f.name)


def sass(compiled) -> str:
    """The SASS of the compiled cubin."""
    return _cuobjdump(compiled, "-sass")


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the binary needs per CTA and what that allows per SM on sm_90."""

    regs: int
    spill_bytes: int  # local + stack bytes per thread: 0 when nothing spills
    smem: int  # bytes per CTA: static (incl. the 1 KB reserved) + Triton's dynamic allocation
    warps: int
    wgmma: bool
    ctas_by_regs: int
    ctas_by_smem: int

    @property
    def ctas(self) -> int:
        return min(self.ctas_by_regs, self.ctas_by_smem, SM90_MAX_WARPS // self.warps, SM90_MAX_CTAS)


def facts(compiled) -> Facts:
    """Resource usage of the exact cubin (cuobjdump) and the CTAs/SM it allows against sm_90 limits."""
    usage = _cuobjdump(compiled, "--dump-resource-usage")
    field = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    warps = compiled.metadata.num_warps
    regs = field["REG"]
    smem = field["SHARED"] + compiled.metadata.shared
    regs_per_warp = -(-regs * 32 // REG_UNIT) * REG_UNIT
    warps_by_regs = (SM90_REGS // regs_per_warp) // WARP_UNIT * WARP_UNIT
    smem_per_cta = -(-smem // SMEM_UNIT) * SMEM_UNIT
    return Facts(regs=regs, spill_bytes=field["LOCAL"] + field["STACK"], smem=smem, warps=warps,
                 wgmma="wgmma.mma_async" in compiled.asm["ptx"], ctas_by_regs=warps_by_regs // warps,
                 ctas_by_smem=SM90_SMEM // smem_per_cta)


def problems(f: Facts, need_wgmma: bool, min_ctas: int = 2) -> list[str]:
    """Why this binary misses the targets (no spills, >= min_ctas CTAs/SM, wgmma): empty when it meets them."""
    out = []
    if f.spill_bytes:
        out.append(f"spills {f.spill_bytes} bytes/thread")
    if f.ctas < min_ctas:
        out.append(f"{f.ctas} CTA/SM (regs allow {f.ctas_by_regs}, smem {f.ctas_by_smem}) < {min_ctas}")
    if need_wgmma and not f.wgmma:
        out.append("no wgmma in the PTX")
    return out


def wgmma_expected(launch: Launch) -> bool:
    """wgmma takes 64 rows per warpgroup: expected where the kernel's row block (its dots' M) is >= 64."""
    if launch.name == "_bwd_delta_kernel":
        return False
    by_keys = launch.name in ("_bwd_kv_kernel", "_bwd_fused_kernel")  # their dots' rows are key rows
    rows = launch.kwargs["BLOCK_N"] if by_keys else launch.kwargs["BLOCK_M"]
    return rows >= 64


def label(launch: Launch) -> str:
    """Short name of a launch: kernel plus the flags that change the binary."""
    name = launch.name.replace("_bwd_", "").replace("_kernel", "").strip("_")
    flags = [k for k in ("ATOMIC", "ATOMIC_DQ", "BANK_ATOMIC", "BANK_SHARED", "ONE_LOOP", "ALIGNED")
             if launch.kwargs.get(k)]
    return name + "".join(f" {f.lower()}" for f in flags)


def table(rows: list[tuple[str, Launch, Facts]], stages: bool = False) -> str:
    """Markdown table of (case, launch, facts) rows, as kept in the kernel module's docstring (stages: the
    block column also gives the pipeline stages, as the autotune candidates differ in them)."""
    lines = ["| case | kernel | grid | warps | block m x n | regs | spill | smem KB | CTAs/SM (regs, smem) | wgmma |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, launch, f in rows:
        kw = launch.kwargs
        block = f"{kw.get('BLOCK_M', '-')} x {kw.get('BLOCK_N', '-')}"
        if stages:
            block += f", {kw.get('num_stages', '-')} stages"
        grid = "x".join(str(g) for g in launch.grid)
        lines.append(f"| {case} | {label(launch)} | {grid} | {f.warps} | {block} | {f.regs} | {f.spill_bytes} | "
                     f"{f.smem / 1024:.1f} | {f.ctas} ({f.ctas_by_regs}, {f.ctas_by_smem}) | "
                     f"{'yes' if f.wgmma else 'no'} |")
    return "\n".join(lines)


def compile_all(module: ModuleType) -> list[tuple[str, Launch, object]]:
    """(case, launch, compiled) of every distinct launch at the paper and IPG shapes: atomic and
    deterministic modes, the one-pass backward and the 3-launch one (the path for N > 256)."""
    rows, seen = [], set()
    for case in ("paper", "ipg"):
        for fused in (True, False):
            for deterministic in (False, True):
                for launch in record_launches(module, case, deterministic, fused=fused):
                    key = (case, label(launch))
                    if key not in seen:
                        seen.add(key)
                        rows.append((case, launch, compile_launch(launch)))
    return rows


TUNABLE = {"_fwd_kernel": "fwd", "_bwd_fused_kernel": "fused", "_bwd_dq_kernel": "dq"}


def candidate_launches(module: ModuleType, case: str | dict,
                       dtype: torch.dtype = torch.bfloat16) -> list[Launch]:
    """Every autotune candidate of the tunable launches of one atomic-mode forward + backward (both
    backward paths) at a case shape: the recorded launch with the candidate's block sizes, warps, stages."""
    from ._configs import TUNED, candidate_params

    c = CASES[case] if isinstance(case, str) else case
    out, seen = [], set()
    for fused in (True, False):
        for launch in record_launches(module, c, dtype=dtype, fused=fused):
            kernel = TUNABLE.get(launch.name)
            if kernel is None:
                continue
            for params in candidate_params(kernel, dtype, c["N"], c["S"], c["Pm"], c["Pi"], c["D"]):
                kwargs = {**{k: v for k, v in launch.kwargs.items() if k not in TUNED}, **params}
                key = (launch.name, tuple(sorted(kwargs.items())))
                if key not in seen:
                    seen.add(key)
                    out.append(Launch(launch.name, launch.fn, launch.grid, launch.args, kwargs))
    return out


def measure(module: ModuleType) -> list[tuple[str, Launch, Facts]]:
    """Facts of every launch of `compile_all`."""
    return [(case, launch, facts(compiled)) for case, launch, compiled in compile_all(module)]


def binary_facts(case: str, launch: Launch, compiled) -> dict:
    """JSON-able facts of one compiled launch, for tests that run the compiler in a child process."""
    ptx = compiled.asm["ptx"]
    atomics = re.findall(r"\b(?:red|atom)\.[\w.]+", ptx)
    code = sass(compiled) if atomics else ""
    return dict(case=case, name=launch.name, label=label(launch), kwargs={k: v for k, v in launch.kwargs.items()
                                                                          if isinstance(v, (bool, int, str))},
                facts=dataclasses.asdict(facts(compiled)), problems=problems(facts(compiled), wgmma_expected(launch)),
                specialised=bool(compiled.src.constants), hinted=any(bool(a) for a in compiled.src.attrs.values()),
                ptx_atomics=atomics, redg=bool(re.search(r"\bREDG\.", code)),
                fences=[f for f in ("MEMBAR.ALL.GPU", "MEMBAR.SC", "CCTL.IVALL", "ATOMG.") if f in code],
                cp_async="cp.async" in ptx)


if __name__ == "__main__":
    import json
    import sys

    from mip_dist.kernels import _backend

    if "--candidates" in sys.argv[1:]:  # every autotune candidate at the paper and IPG shapes
        rows = [(case, launch, compile_launch(launch)) for case in CASES
                for launch in candidate_launches(_backend.kernel_module(), case)]
    else:
        rows = compile_all(_backend.kernel_module())
    if "--json" in sys.argv[1:]:  # for tests/test_kernel_compile.py, which runs this without the interpreter
        print(json.dumps(dict(table=table([(c, l, facts(x)) for c, l, x in rows]),
                              rows=[binary_facts(*r) for r in rows])))
    else:
        print(table([(c, l, facts(x)) for c, l, x in rows], stages="--candidates" in sys.argv[1:]))
