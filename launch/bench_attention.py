"""Benchmark the fused prompt attention against concat + SDPA (each backend), FlexAttention and PyTorch.

GPU: every implementation's output and all 7 gradients are checked against the fp32 reference
first (a wrong one is not timed); then forward, backward and forward+backward time, twice: launched
one by one (triton.testing.do_bench, median: host launch cost included) and replayed from a CUDA graph
(do_bench_cudagraph: GPU time only); TFLOP/s, effective GB/s and the HBM bound (ideal bytes: every
input and output moved once, forward plus backward for fwd+bwd; peak bandwidth from the GPU's name,
or a measured device copy) per row, at the paper block shapes and the IPG shape; FlexAttention is
compiled per shape (the recompile limit sized to the sweep). --e2e adds the paper model's
forward+backward img/s for attention.impl triton / torch / concat. Prints a table and writes JSON
(--out), rewritten as each implementation finishes a shape, so a run cut short keeps the rows it finished.
CPU: runs the Triton-interpreter correctness smoke instead (small shapes vs the fp64 reference) and says
that timings need a GPU.

    python launch/bench_attention.py --out bench_attention.json
    python launch/bench_attention.py --batch 64 --tokens 211 --impls fused-triton concat+sdpa-flash torch-path \
        --modes fwd fwd+bwd --out bench_attention.json     # the paper block and IPG calls only (gpu_check.py)
    python launch/bench_attention.py --e2e --impls fused-triton   # + model img/s per attention.impl
    python launch/bench_attention.py --analytic         # counted HBM bytes per design vs ideal (no GPU)
    python launch/bench_attention.py --host-overhead    # Python launch time, kernels stubbed (no GPU)
    git worktree add /tmp/old HEAD~1 && python launch/bench_attention.py --host-overhead --baseline-kernels /tmp/old/kernels
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional
from unittest import mock

import torch


class _KernelsFrom:
    """Import hook: `mip_dist.kernels` and its modules from another copy of kernels/ (the --baseline-kernels
    child process), ahead of the editable install's mapping to this checkout."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def find_spec(self, fullname: str, path=None, target=None):
        from importlib.machinery import PathFinder

        if fullname == "mip_dist.kernels":
            return importlib.util.spec_from_file_location(fullname, self.path / "__init__.py",
                                                          submodule_search_locations=[str(self.path)])
        if fullname.startswith("mip_dist.kernels."):
            return PathFinder.find_spec(fullname, [str(self.path)])
        return None


REPO = Path(__file__).resolve().parents[1]
if os.environ.get("MIP_BENCH_KERNELS_DIR"):  # --baseline-kernels child: time another copy of kernels/
    sys.meta_path.insert(0, _KernelsFrom(Path(os.environ["MIP_BENCH_KERNELS_DIR"])))

from mip_dist.kernels import prompt_attention, prompt_attention_math  # noqa: E402
from mip_dist.kernels.reference import gather_keys  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
GRADS = ("q", "k", "v", "bank_k", "bank_v", "inst_k", "inst_v")
# HBM bytes/s by GPU name (first match wins; most specific first); otherwise a measured device copy
PEAK_BW = (("H200", 4.8e12), ("GH200", 4.0e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12),
           ("H800", 3.35e12), ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12),
           ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12), ("B200", 8.0e12))
GRAD_TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-3}  # max |err| / max |ref|


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[129, 211], help="N = S (queries = sequence keys)")
    p.add_argument("--bank-len", type=int, default=16, help="Pm, modality prompts per entry")
    p.add_argument("--bank-entries", type=int, default=2, help="M (infrared, visible)")
    p.add_argument("--inst-len", type=int, default=16, help="Pi, instance prompts per sample")
    p.add_argument("--ipg-queries", type=int, default=16, help="IPG rows: broadcast queries (0: no IPG rows)")
    p.add_argument("--ipg-keys", type=int, default=210, help="IPG sequence keys (patches)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--peak-bw", type=float, default=None,
                   help="HBM bytes/s for the bound (default: from the GPU name, else a measured copy)")
    p.add_argument("--impls", nargs="+", default=None, help="subset of implementations to run (default: all)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to time (default: all)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    p.add_argument("--analytic", action="store_true", help="print counted HBM bytes per design vs ideal, exit")
    p.add_argument("--host-overhead", action="store_true",
                   help="time the Python launch path with the kernels stubbed out (CPU), exit")
    p.add_argument("--baseline-kernels", type=Path, default=None,
                   help="with --host-overhead: also time this copy of the kernels/ folder, side by side")
    p.add_argument("--host-overhead-rows", action="store_true", help=argparse.SUPPRESS)  # the baseline child
    p.add_argument("--host-iters", type=int, default=300, help="--host-overhead calls per repeat")
    p.add_argument("--host-rounds", type=int, default=3, help="--host-overhead alternating rounds (least kept)")
    p.add_argument("--e2e", action="store_true",
                   help="GPU: also time the paper model's forward+backward (img/s) per attention.impl")
    p.add_argument("--e2e-config", default=str(REPO / "configs" / "mip_vitb16_sysu.yaml"))
    p.add_argument("--e2e-batch", type=int, default=64)
    p.add_argument("--e2e-rounds", type=int, default=3, help="alternating timed rounds per impl")
    p.add_argument("--e2e-steps", type=int, default=5, help="steps per round")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# shapes, inputs, FLOPs
# ----------------------------------------------------------------------------------------------
def cases(args: argparse.Namespace) -> list[dict]:
    """Paper block calls (per batch and token count) and the IPG call (broadcast queries, one-entry bank)."""
    out = [dict(kind="block", B=B, H=args.heads, N=N, S=N, D=args.head_dim, M=args.bank_entries,
                Pm=args.bank_len, Pi=args.inst_len, broadcast_q=False, indexed=True)
           for B in args.batch for N in args.tokens]
    if args.ipg_queries:
        out += [dict(kind="ipg", B=B, H=args.heads, N=args.ipg_queries, S=args.ipg_keys, D=args.head_dim, M=1,
                     Pm=args.ipg_queries, Pi=0, broadcast_q=True, indexed=False) for B in args.batch]
    return out


def make_inputs(c: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Leaf tensors of one call: q/k/v, the bank (indexed or one shared entry), instance prompts if any."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(True)

    B, H, N, S, D, M, Pm, Pi = (c[k] for k in ("B", "H", "N", "S", "D", "M", "Pm", "Pi"))
    x = dict(q=rnd(1 if c["broadcast_q"] else B, H, N, D), k=rnd(B, H, S, D), v=rnd(B, H, S, D),
             bank_k=rnd(M, H, Pm, D), bank_v=rnd(M, H, Pm, D),
             bank_index=(torch.arange(B, device=device) % M) if c["indexed"] else None)
    if Pi:
        x.update(inst_k=rnd(B, H, Pi, D), inst_v=rnd(B, H, Pi, D))
    return x


def leaves(x: dict) -> list[torch.Tensor]:
    return [t for t in x.values() if t is not None and t.is_floating_point()]


def keys_per_query(c: dict) -> int:
    return c["S"] + c["Pm"] + c["Pi"]


def flops(c: dict, mode: str) -> float:
    """Useful matmul FLOPs: fwd 2 GEMMs (4NLD per head); bwd 2.5x fwd (FA2 convention)."""
    fwd = 4.0 * c["B"] * c["H"] * c["N"] * keys_per_query(c) * c["D"]
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


# ----------------------------------------------------------------------------------------------
# HBM traffic: ideal and per design (counted, not measured; L2 absorbs re-reads within a (b, h))
# ----------------------------------------------------------------------------------------------
def tensor_bytes(c: dict, es: int) -> dict[str, int]:
    """Bytes of each operand at element size `es` ('rows': one fp32 per (b, h, query): lse or delta)."""
    B, H, N, S, D, M, Pm, Pi = (c[k] for k in ("B", "H", "N", "S", "D", "M", "Pm", "Pi"))
    return dict(q=(1 if c["broadcast_q"] else B) * H * N * D * es, o=B * H * N * D * es, kv=2 * B * H * S * D * es,
                inst=2 * B * H * Pi * D * es, bank=2 * M * H * Pm * D * es, index=8 * B if c["indexed"] else 0,
                rows=4 * B * H * N)


def ideal_bytes(c: dict, es: int) -> dict[str, float]:
    """Every input read once and every output written once; fwd+bwd is the sum of the two passes."""
    t = tensor_bytes(c, es)
    ins = t["q"] + t["kv"] + t["inst"] + t["bank"] + t["index"]
    fwd = ins + t["o"] + t["rows"]  # o and lse written
    bwd = ins + 2 * t["o"] + t["rows"] + t["q"] + t["kv"] + t["inst"] + t["bank"]  # o, do, lse in; grads out
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def _fp32_bank_grads(c: dict, es: int) -> float:
    """Atomic fp32 bank gradients: zero-fill, atomic write-back, then the cast's read and write."""
    t = tensor_bytes(c, es)
    f32 = t["bank"] * 4 / es
    return 3 * f32 + t["bank"]


def three_launch_bytes(c: dict, es: int) -> dict[str, float]:
    """The 3-launch backward (the path for N > 256): delta pass, dq pass, dk/dv pass (atomic mode)."""
    t = tensor_bytes(c, es)
    keys = t["kv"] + t["inst"] + t["bank"] + t["index"]
    fwd = ideal_bytes(c, es)["fwd"]
    delta = 2 * t["o"] + t["rows"]
    dq_out = 3 * t["q"] * 4 / es + t["q"] if c["broadcast_q"] else t["q"]  # fp32 zero, atomics, cast
    dq = t["q"] + t["o"] + keys + 2 * t["rows"] + dq_out
    kv = t["q"] + t["o"] + keys + 2 * t["rows"] + t["kv"] + t["inst"] + _fp32_bank_grads(c, es)
    return {"fwd": fwd, "bwd": delta + dq + kv, "fwd+bwd": fwd + delta + dq + kv}


def one_pass_bytes(c: dict, es: int, slots: int = 264) -> dict[str, float]:
    """The default for N <= 256: persistent programs own whole (b, h) tiles and compute scores and dP once
    (delta folded in); each program's fp32 dq/delta workspace slot is reused tile after tile, so it is
    written back once (slots = 132 SMs x 2 CTAs on an H100 SXM), not per tile."""
    t = tensor_bytes(c, es)
    ideal = ideal_bytes(c, es)
    workspace = min(slots, c["B"] * c["H"]) * c["N"] * (c["D"] + 1) * 4
    dq_extra = 3 * t["q"] * 4 / es if c["broadcast_q"] else 0  # broadcast q: fp32 zero, atomics, cast
    bwd = ideal["bwd"] - t["bank"] + _fp32_bank_grads(c, es) + workspace + dq_extra
    return {"fwd": ideal["fwd"], "bwd": bwd, "fwd+bwd": ideal["fwd"] + bwd}


DESIGNS = {"3-launch: delta, dq, dk/dv (N > 256)": three_launch_bytes,
           "one-pass: persistent (b, h) tiles (N <= 256)": one_pass_bytes}


def analytic(args: argparse.Namespace) -> dict:
    """Counted HBM bytes per design and mode, with the ratio to the ideal bytes, at every case."""
    es = DTYPES[args.dtype].itemsize
    rows = []
    print(f"{'case':34s} {'design':46s} {'mode':8s} {'MB':>9s} {'ideal MB':>9s} {'x ideal':>8s}")
    for c in cases(args):
        name = f"{c['kind']} B={c['B']} N={c['N']} S={c['S']} Pm={c['Pm']} Pi={c['Pi']}"
        ideal = ideal_bytes(c, es)
        for design, count in DESIGNS.items():
            got = count(c, es)
            for mode in MODES:
                rows.append(dict(case=name, design=design, mode=mode, bytes=got[mode], ideal_bytes=ideal[mode],
                                 x_ideal=got[mode] / ideal[mode]))
                print(f"{name:34s} {design:46s} {mode:8s} {got[mode] / 1e6:9.1f} {ideal[mode] / 1e6:9.1f} "
                      f"{got[mode] / ideal[mode]:8.2f}")
    return {"analytic": rows, "dtype": args.dtype}


# ----------------------------------------------------------------------------------------------
# host overhead: the Python launch path with every kernel stubbed out
# ----------------------------------------------------------------------------------------------
def _per_call_us(fn: Callable[[], object], iters: int, repeats: int = 9) -> float:
    """Least mean CPU time of this thread per call over repeats, in microseconds: the host path is one Python
    thread, and its CPU time leaves out the time other processes hold the core (wall time does not)."""
    for _ in range(max(iters // 10, 5)):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.thread_time()
        for _ in range(iters):
            fn()
        samples.append((time.thread_time() - t0) / iters * 1e6)
    return min(samples)


@contextlib.contextmanager
def routed_to(module: ModuleType):
    """Send `prompt_attention(impl='triton')` on meta tensors to `module` (its kernels stubbed)."""
    from mip_dist import kernels
    from mip_dist.kernels import _introspect, _op

    with _introspect.stub_kernels(module), mock.patch.object(_op, "kernel_module", lambda: module), \
            mock.patch.object(kernels, "triton_unsupported", lambda q: None):
        yield


def _autograd_floor(xs: list, o: torch.Tensor, lse: torch.Tensor) -> type:
    """An autograd.Function with the entry's 10 inputs and 10 saved tensors that does no work: what autograd
    itself costs per call, which no launcher change can remove."""
    grads = tuple(t.new_empty(t.shape) if t is not None and t.is_floating_point() else None for t in xs) + (None, None)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = o.new_empty(o.shape)  # (empty_like goes through a slow Python path on meta tensors)
            ctx.save_for_backward(*args[:8], out, lse)
            return out

        @staticmethod
        def backward(ctx, do):
            ctx.saved_tensors
            return grads

    return Floor


def host_overhead_of(module: ModuleType, c: dict, iters: int) -> dict[str, float]:
    """Microseconds per call of the launchers and of the full entry point + autograd, kernels stubbed."""
    from mip_dist.kernels import _introspect, _op

    x = [t.to("meta") if t is not None else None for t in _introspect.case_inputs(c, torch.bfloat16)]
    scale = c["D"] ** -0.5
    out = {}
    with routed_to(module):
        o, lse = module.forward(*x, scale)
        do = torch.empty_like(o)
        out["launcher fwd"] = _per_call_us(lambda: module.forward(*x, scale), iters)
        out["launcher bwd"] = _per_call_us(lambda: module.backward(do, *x, o, lse, scale, False), iters)
        xs = [t.requires_grad_(True) if t is not None and t.is_floating_point() else t for t in x]
        need = [t for t in xs if t is not None and t.requires_grad]
        names = ("q", "k", "v", "bank_k", "bank_v", "bank_index", "inst_k", "inst_v")
        kw = dict(zip(names, xs))
        with torch.no_grad():
            out["entry fwd (no grad)"] = _per_call_us(lambda: prompt_attention(**kw, impl="triton"), iters)
        y = prompt_attention(**kw, impl="triton")
        out["entry fwd (autograd)"] = _per_call_us(lambda: prompt_attention(**kw, impl="triton"), iters)
        out["entry bwd (autograd.grad)"] = _per_call_us(
            lambda: torch.autograd.grad(y, need, do, retain_graph=True), iters)
        # the eager autograd.Function vs the custom op it stands in for (same formula, no input checks), and
        # autograd's own cost for a Function of this signature that does nothing
        floor = _autograd_floor(xs, o, lse)
        for name, call in (("Function", lambda: _op._PromptAttention.apply(*xs, scale, False)),
                           ("custom op", lambda: _op.prompt_attention_fwd(*xs, scale, False)[0]),
                           ("no-op Function (autograd floor)", lambda: floor.apply(*xs, scale, False))):
            out[f"{name} fwd"] = _per_call_us(call, iters)
            z = call()
            out[f"{name} bwd"] = _per_call_us(lambda: torch.autograd.grad(z, need, do, retain_graph=True), iters)
    return out


def host_overhead_rows(iters: int, label: str) -> list[dict]:
    """host_overhead_of this process's kernels at the paper and IPG shapes, as rows."""
    from mip_dist.kernels import _backend, _introspect

    return [dict(case=case, kernels=label, path=what, us=us) for case in ("paper", "ipg")
            for what, us in host_overhead_of(_backend.kernel_module(), _introspect.CASES[case], iters).items()]


def host_overhead(args: argparse.Namespace) -> dict:
    """Per-call host time (kernels stubbed) of this checkout's kernels and optionally a baseline copy of the
    kernels/ folder (e.g. a `git worktree` of an older commit), the baseline measured in a child process
    that imports it in place of this checkout's; rows side by side with the ratio baseline / current."""
    samples = []
    labels = ["current"] if args.baseline_kernels is None else ["baseline", "current"]
    for _ in range(args.host_rounds):  # alternating rounds, the least per path: load drifts between runs
        if args.baseline_kernels is not None:
            env = {**os.environ, "MIP_BENCH_KERNELS_DIR": str(args.baseline_kernels.resolve())}
            child = subprocess.run([sys.executable, __file__, "--host-overhead-rows", "--host-iters",
                                    str(args.host_iters)], env=env, capture_output=True, text=True, timeout=900)
            if child.returncode != 0:
                raise RuntimeError(f"baseline kernels {args.baseline_kernels}: {child.stderr[-2000:]}")
            samples += json.loads(child.stdout.strip().splitlines()[-1])
        samples += host_overhead_rows(args.host_iters, "current")
    least: dict[tuple, dict] = {}
    for r in samples:
        key = (r["case"], r["kernels"], r["path"])
        if key not in least or r["us"] < least[key]["us"]:
            least[key] = r
    rows = list(least.values())
    print(f"host CPU time per call (this thread, least of {args.host_rounds} rounds x 9 repeats x {args.host_iters} "
          f"calls), kernels stubbed, meta tensors ({platform.processor() or platform.machine()}, {os.cpu_count()} "
          "CPUs); triton's own launch cost is not included")
    print(f"{'case':6s} {'path':38s} " + " ".join(f"{k:>10s}" for k in labels)
          + (f" {'ratio':>7s}" if len(labels) > 1 else ""))
    for case in ("paper", "ipg"):
        for what in dict.fromkeys(r["path"] for r in rows):
            us = {r["kernels"]: r["us"] for r in rows if r["case"] == case and r["path"] == what}
            line = f"{case:6s} {what:38s} " + " ".join(f"{us[k]:8.1f}us" if k in us else f"{'-':>10s}"
                                                       for k in labels)
            if len(us) > 1:
                line += f" {us['baseline'] / us['current']:6.2f}x"
            print(line)
    return {"host_overhead": rows}


# ----------------------------------------------------------------------------------------------
# implementations: each maps inputs -> o
# ----------------------------------------------------------------------------------------------
def _batched_q(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q broadcast over the keys' batch (the IPG call's q has batch 1)."""
    return q.expand(keys.shape[0], -1, -1, -1) if q.shape[0] != keys.shape[0] else q


def concat_sdpa(backend) -> Callable:
    """Literal concatenation [bank[idx] | inst | seq] then SDPA pinned to one backend."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, bank_k, bank_v, bank_index, inst_k=None, inst_v=None):
        keys, values = gather_keys(k, v, bank_k, bank_v, bank_index, inst_k, inst_v)
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(_batched_q(q, keys), keys, values)

    return run


def flex_concat(shapes: int) -> Callable:
    """FlexAttention, compiled once per shape and grad mode (dynamic=False): dynamo's recompile limit is
    raised to cover the sweep's `shapes`, and hitting it raises instead of silently falling back to eager
    (which would time an uncompiled FlexAttention)."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    needed = 2 * shapes + 4  # no-grad and grad forward per shape, and a margin
    for name in ("recompile_limit", "cache_size_limit"):  # the newer name, then its older alias
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), needed))
            break
    if hasattr(config, "fail_on_recompile_limit_hit"):
        config.fail_on_recompile_limit_hit = True
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, bank_k, bank_v, bank_index, inst_k=None, inst_v=None):
        keys, values = gather_keys(k, v, bank_k, bank_v, bank_index, inst_k, inst_v)
        return flex(_batched_q(q, keys).contiguous(), keys, values)

    return run


def implementations(shapes: int = 1) -> dict[str, Callable]:
    """name -> fn(**inputs) -> o for every implementation; `shapes`: how many shapes the sweep compiles for."""
    from torch.nn.attention import SDPBackend

    impls: dict[str, Callable] = {
        "fused-triton": lambda **x: prompt_attention(**x, impl="triton"),
        "fused-triton-det": lambda **x: prompt_attention(**x, impl="triton", deterministic=True),
    }
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            impls[f"concat+sdpa-{name.lower().replace('_attention', '')}"] = concat_sdpa(getattr(SDPBackend, name))
    impls["flex-attention"] = flex_concat(shapes)
    impls["torch-path"] = lambda **x: prompt_attention(**x, impl="torch")
    impls["torch-math"] = lambda **x: prompt_attention_math(**x)
    return impls


# ----------------------------------------------------------------------------------------------
# GPU benchmark
# ----------------------------------------------------------------------------------------------
def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def peak_bandwidth(name: str) -> Optional[float]:
    """Datasheet HBM bytes/s for a GPU name, or None when the name is not in PEAK_BW."""
    for key, bw in PEAK_BW:
        if key.lower() in name.lower():
            return bw
    return None


def measured_copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy (read + write), the achievable-bandwidth fallback."""
    from triton.testing import do_bench

    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def _timer(name: str, warmup: int, rep: int) -> Callable:
    """bench(fn, grad_to_none) -> median ms: triton's do_bench, or do_bench_cudagraph (one graph of unrolled
    calls, so the host's launch cost drops out and what is left is the GPU time)."""
    from triton.testing import do_bench, do_bench_cudagraph

    if name == "do_bench":
        return lambda fn, grads=None: do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grads, return_mode="median")
    return lambda fn, grads=None: do_bench_cudagraph(fn, rep=rep, grad_to_none=grads, return_mode="median")


def time_modes(fn: Callable, x: dict, warmup: int, rep: int, timer: str = "do_bench",
               modes: tuple[str, ...] = MODES) -> dict[str, object]:
    """Median ms of forward (no grad), backward (retained graph) and forward+backward (those in `modes`) with
    `timer`; an error string instead of a time for a mode that fails (e.g. a backend without a backward, or not
    capturable)."""
    bench = _timer(timer, warmup, rep)
    grads = leaves(x)
    out: dict[str, object] = {}
    with torch.no_grad():
        do = torch.randn_like(fn(**x))

    def fwd() -> None:
        with torch.no_grad():
            fn(**x)

    for mode in modes:
        try:
            if mode == "fwd":
                out[mode] = bench(fwd)
            elif mode == "bwd":
                o = fn(**x)
                out[mode] = bench(lambda: o.backward(do, retain_graph=True), grads)
                del o
            else:
                out[mode] = bench(lambda: fn(**x).backward(do), grads)
        except Exception as exc:
            out[mode] = _reason(exc)
    return out


def check_against_reference(fn: Callable, x: dict) -> dict[str, float]:
    """max |err| / max |ref| of o and of every gradient (all 7 where present) vs the fp32 reference."""
    x32 = {k: (t.detach().float().requires_grad_(True) if t is not None and t.is_floating_point() else t)
           for k, t in x.items()}
    ref = prompt_attention_math(**x32)
    do = torch.randn_like(ref)
    ref.backward(do)
    for t in leaves(x):
        t.grad = None
    o = fn(**x)
    o.backward(do.to(o.dtype))
    errs = {"o": ((o.float() - ref).abs().max() / ref.abs().max()).item()}
    for name in GRADS:
        if x.get(name) is not None:
            got, want = x[name].grad, x32[name].grad
            errs[name] = float("inf") if got is None else ((got.float() - want).abs().max()
                                                            / want.abs().max().clamp_min(1e-30)).item()
    for t in leaves(x):
        t.grad = None
    return errs


def bench_gpu(args: argparse.Namespace, save: Callable[[dict], None] = lambda result: None,
              device: str = "cuda") -> dict:
    """Check then time every implementation at every case; `save` gets the result so far after each
    implementation, so a run cut short keeps the rows it finished."""
    dtype = DTYPES[args.dtype]
    modes = tuple(m for m in MODES if m in args.modes)
    device_name = torch.cuda.get_device_name() if device == "cuda" else device
    peak, peak_source = args.peak_bw, "--peak-bw"
    if peak is None:
        peak, peak_source = peak_bandwidth(device_name), "datasheet"
    if peak is None:
        peak, peak_source = measured_copy_bandwidth(), "measured copy"
    print(f"peak HBM bandwidth {peak / 1e12:.2f} TB/s ({peak_source})")
    impls = implementations(len(cases(args)))
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    es = dtype.itemsize
    rows: list[dict] = []

    def result() -> dict:
        """Rows so far with their ratios to the fused kernel."""
        add_speedups(rows)
        return {"device": device_name, "peak_bw": peak, "peak_bw_source": peak_source, "rows": rows}

    for c in cases(args):
        x = make_inputs(c, dtype, device)
        ideal = ideal_bytes(c, es)
        for name, fn in impls.items():
            base = dict(impl=name, case=c["kind"], B=c["B"], H=c["H"], N=c["N"], S=c["S"], L=keys_per_query(c),
                        D=c["D"], dtype=args.dtype)
            try:
                errs = check_against_reference(fn, x)
                bad = {k: e for k, e in errs.items() if not e <= GRAD_TOL[dtype]}
                times = ({mode: f"wrong vs reference: {bad}" for mode in modes} if bad
                         else time_modes(fn, x, args.warmup, args.rep, modes=modes))
                graph = times if bad else time_modes(fn, x, args.warmup, args.rep, timer="cuda graph", modes=modes)
            except Exception as exc:  # a backend may not take these shapes/dtype on this GPU
                errs, times = None, {mode: _reason(exc) for mode in modes}
                graph = times
            for mode in modes:
                ms, ms_graph = times[mode], graph[mode]
                if isinstance(ms, str):
                    rows.append({**base, "mode": mode, "status": "unavailable", "reason": ms, "rel_err": errs})
                    continue
                bound_ms = ideal[mode] / peak * 1e3
                row = {**base, "mode": mode, "status": "ok", "ms": ms, "rel_err": errs,
                       "tflops": flops(c, mode) / ms * 1e-9, "gbps": ideal[mode] / ms * 1e-6,
                       "hbm_bound_ms": bound_ms, "x_hbm_bound": ms / bound_ms}
                if isinstance(ms_graph, str):
                    row["graph_reason"] = ms_graph
                else:
                    row.update(ms_graph=ms_graph, x_hbm_bound_graph=ms_graph / bound_ms)
                rows.append(row)
            summary = ", ".join(f"{m} {times[m]:.3f} ms" if not isinstance(times[m], str)
                                else f"{m} unavailable ({times[m]})" for m in modes)
            summary += " | cuda graph: " + ", ".join(f"{m} {graph[m]:.3f}" if not isinstance(graph[m], str)
                                                    else f"{m} n/a" for m in modes)
            if errs is not None:
                summary += f" (max rel err {max(errs.values()):.2e} over o + {len(errs) - 1} grads)"
            print(f"  {name:28s} {c['kind']} B={c['B']} N={c['N']}: {summary}", flush=True)
            save(result())
        del x
        if device == "cuda":
            torch.cuda.empty_cache()
    return result()


E2E_IMPLS = ("triton", "torch", "concat")  # fused kernel, exact compute in PyTorch, literal concatenation


def bench_e2e(args: argparse.Namespace) -> dict:
    """The paper model's forward + MIPLoss + backward in bf16, img/s per attention.impl, in alternating rounds
    on one model (same weights and inputs): triton / torch isolates the kernel (both compute the same
    exact attention), torch / concat the exact compute."""
    import statistics

    from mip_dist.config import load_config
    from mip_dist.losses import MIPLoss
    from mip_dist.model import build_model

    cfg = load_config(args.e2e_config, ["model.pretrained="])  # random init: never downloads weights
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, num_classes=395, num_cameras=6)
    model = model.to(device="cuda", dtype=torch.bfloat16).train()
    criterion, B = MIPLoss(cfg.loss), args.e2e_batch
    images = torch.randn(B, 3, *cfg.model.img_size, device="cuda", dtype=torch.bfloat16)
    modality, camera, pids = (torch.arange(B, device="cuda") % 2, torch.arange(B, device="cuda") % 6,
                              torch.arange(B, device="cuda") // 4)

    def steps(impl: str, n: int) -> float:
        """Seconds per step over n steps (CUDA events)."""
        model.attention_impl = impl
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            model.zero_grad(set_to_none=True)
            criterion(model(images, modality, camera), pids, modality, epoch=1000)[0].backward()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    for impl in E2E_IMPLS:  # warm-up: autotuning, compilation, allocator
        steps(impl, 2)
    per_step: dict[str, list[float]] = {impl: [] for impl in E2E_IMPLS}
    for r in range(args.e2e_rounds):
        for impl in (E2E_IMPLS if r % 2 == 0 else E2E_IMPLS[::-1]):
            per_step[impl].append(steps(impl, args.e2e_steps))
    img_s = {impl: B / statistics.median(t) for impl, t in per_step.items()}
    print(f"\nend to end: {cfg.model.embed_dim}d x {cfg.model.depth} blocks, batch {B}, bf16, forward + loss + "
          f"backward, median of {args.e2e_rounds} alternating rounds x {args.e2e_steps} steps")
    for impl in E2E_IMPLS:
        print(f"  attention.impl {impl:7s} {img_s[impl]:8.1f} img/s")
    print(f"  triton / torch (the kernel, same exact compute): {img_s['triton'] / img_s['torch']:.2f}x; "
          f"torch / concat (exact compute): {img_s['torch'] / img_s['concat']:.2f}x")
    return {"e2e": {"batch": B, "img_s": img_s, "sec_per_step": per_step,
                    "triton_over_torch": img_s["triton"] / img_s["torch"],
                    "torch_over_concat": img_s["torch"] / img_s["concat"]}}


def _row_key(r: dict) -> tuple:
    return r["case"], r["B"], r["N"], r["mode"]


def add_speedups(rows: list[dict]) -> None:
    """Each ok row gets fused_speedup = its time / fused-triton's at the same shape and mode (do_bench), and
    fused_speedup_graph from the CUDA-graph times where both have one."""
    for ms, out in (("ms", "fused_speedup"), ("ms_graph", "fused_speedup_graph")):
        fused = {_row_key(r): r[ms] for r in rows if r["impl"] == "fused-triton" and ms in r}
        for r in rows:
            if ms in r and _row_key(r) in fused:
                r[out] = r[ms] / fused[_row_key(r)]


def print_table(rows: list[dict]) -> None:
    nan = float("nan")
    head = (f"{'impl':28s} {'case':5s} {'B':>4s} {'N':>4s} {'mode':8s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>7s} "
            f"{'HBM ms':>7s} {'xHBM':>6s} {'fused x':>8s} {'graph ms':>8s} {'xHBM':>6s} {'fused x':>8s}")
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["case"], r["B"], r["N"], MODES.index(r["mode"]))):
        if r["status"] != "ok":
            print(f"{r['impl']:28s} {r['case']:5s} {r['B']:4d} {r['N']:4d} {r['mode']:8s} unavailable")
            continue
        print(f"{r['impl']:28s} {r['case']:5s} {r['B']:4d} {r['N']:4d} {r['mode']:8s} {r['ms']:8.3f} "
              f"{r['tflops']:8.1f} {r['gbps']:7.0f} {r['hbm_bound_ms']:7.3f} {r['x_hbm_bound']:6.2f} "
              f"{r.get('fused_speedup', nan):8.2f} {r.get('ms_graph', nan):8.3f} {r.get('x_hbm_bound_graph', nan):6.2f} "
              f"{r.get('fused_speedup_graph', nan):8.2f}")
    print("fused x = this row's time / fused-triton's time (same shape, mode); xHBM = time / HBM bound "
          "(ideal bytes of the mode, fwd+bwd = fwd + bwd bytes); graph: the same from do_bench_cudagraph")


# ----------------------------------------------------------------------------------------------
# CPU: interpreter correctness smoke
# ----------------------------------------------------------------------------------------------
SMOKE = [  # B, H, N, S, M, Pm, Pi, D, broadcast q, dtype
    (2, 2, 17, 23, 2, 16, 16, 64, False, torch.float32),
    (3, 1, 16, 40, 1, 16, 0, 32, True, torch.float32),
    (2, 2, 33, 33, 2, 3, 16, 64, False, torch.float16),
]


def smoke_cpu(save: Callable[[dict], None] = lambda result: None) -> dict:
    """Fused kernels under TRITON_INTERPRET=1 vs the fp64 reference: max |error| of o and each gradient; `save`
    gets the results so far after each case."""
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' first use, which imports triton
    results = []
    device = f"cpu ({platform.processor() or platform.machine()}), Triton interpreter"
    for B, H, N, S, M, Pm, Pi, D, bq, dtype in SMOKE:
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        x64 = dict(q=r(1 if bq else B, H, N, D), k=r(B, H, S, D), v=r(B, H, S, D), bank_k=r(M, H, Pm, D),
                   bank_v=r(M, H, Pm, D), bank_index=torch.arange(B) % M,
                   inst_k=r(B, H, Pi, D) if Pi else None, inst_v=r(B, H, Pi, D) if Pi else None)
        do = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
        got, want = {}, {}
        for target, fn, dt in ((got, lambda **x: prompt_attention(**x, impl="triton"), dtype),
                               (want, prompt_attention_math, torch.float64)):
            x = {k: (t.to(dtype).to(dt).requires_grad_(True) if t is not None and t.is_floating_point() else t)
                 for k, t in x64.items()}
            o = fn(**x)
            o.backward(do.to(dt))
            target["o"] = o.detach()
            target.update({k: t.grad for k, t in x.items() if t is not None and t.is_floating_point()})
        errs = {k: (got[k].double() - want[k]).abs().max().item() for k in want}
        case = f"B{B} H{H} N{N} S{S} M{M} Pm{Pm} Pi{Pi} D{D}{' bq' if bq else ''} {str(dtype)[6:]}"
        print(f"  {case:45s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
        results.append({"case": case, "max_abs_err": errs})
        save({"device": device, "smoke": results})
    return {"device": device, "smoke": results}


def write_result(path: Path, result: dict) -> None:
    """The JSON written whole to a temporary file and renamed over `path`: a reader, or a kill, never finds
    half a file, and a run cut short leaves the rows written so far."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    try:  # the version without importing triton: the CPU smoke must choose the interpreter first
        meta["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        meta["triton"] = None

    def save(partial: dict) -> None:
        """Rewrite --out with what is done so far (the GPU rows and CPU smoke cases as each finishes)."""
        if args.out is not None:
            write_result(args.out, {**partial, **meta, "partial": True})

    if args.host_overhead_rows:  # the --baseline-kernels child: rows as one JSON line
        print(json.dumps(host_overhead_rows(args.host_iters, "baseline")))
        return 0
    if args.analytic or args.host_overhead:
        result = {}
        if args.analytic:
            result.update(analytic(args))
        if args.host_overhead:
            result.update(host_overhead(args))
    elif torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}; dtype {args.dtype}, H {args.heads}, D {args.head_dim}, "
              f"Pm {args.bank_len} x {args.bank_entries} entries, Pi {args.inst_len}")
        result = bench_gpu(args, save)
        print()
        print_table(result["rows"])
        if args.e2e:
            result.update(bench_e2e(args))
    else:
        print("No CUDA device: running the Triton-interpreter correctness smoke (max |error| vs fp64).")
        try:
            result = smoke_cpu(save)
        except Exception:
            traceback.print_exc()
            return 1
        print("Timings need a GPU: run this script on a CUDA machine for the benchmark table.")
    result.update(meta, partial=False)
    if args.out is not None:
        write_result(args.out, result)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
