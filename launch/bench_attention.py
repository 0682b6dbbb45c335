"""Benchmark the fused prompt attention against concat + SDPA (each backend), FlexAttention and PyTorch.

GPU: forward, backward and forward+backward time (triton.testing.do_bench, median), TFLOP/s,
effective GB/s and the HBM bound (bytes of inputs and outputs moved once / peak bandwidth) per row;
prints a table and writes JSON (--out). CPU: runs the Triton-interpreter correctness smoke instead
(small shapes vs the fp64 reference) and says that timings need a GPU.

    python launch/bench_attention.py --out bench_attention.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mip_dist.kernels import prompt_attention, prompt_attention_math  # noqa: E402
from mip_dist.kernels.reference import gather_keys  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[129, 211], help="N = S (queries = sequence keys)")
    p.add_argument("--bank-len", type=int, default=16, help="Pm, modality prompts per entry")
    p.add_argument("--bank-entries", type=int, default=2, help="M (infrared, visible)")
    p.add_argument("--inst-len", type=int, default=16, help="Pi, instance prompts per sample")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--peak-bw", type=float, default=3.35e12, help="HBM bytes/s for the bound (H100 SXM: 3.35e12)")
    p.add_argument("--impls", nargs="+", default=None, help="subset of implementations to run (default: all)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench measuring time (ms)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# inputs, FLOPs, bytes
# ----------------------------------------------------------------------------------------------
def make_inputs(B: int, H: int, N: int, D: int, M: int, Pm: int, Pi: int, dtype: torch.dtype,
                device: str, seed: int = 0) -> dict:
    """Leaf tensors of one ReID prompted block: sequence q/k/v, modality bank, instance prompts."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_(True)

    return dict(q=rnd(B, H, N, D), k=rnd(B, H, N, D), v=rnd(B, H, N, D),
                bank_k=rnd(M, H, Pm, D), bank_v=rnd(M, H, Pm, D),
                bank_index=(torch.arange(B, device=device) % M),
                inst_k=rnd(B, H, Pi, D), inst_v=rnd(B, H, Pi, D))


def leaves(x: dict) -> list[torch.Tensor]:
    return [t for t in x.values() if t.is_floating_point()]


def flops(B: int, H: int, N: int, L: int, D: int, mode: str) -> float:
    """Useful matmul FLOPs: fwd 2 GEMMs (4NLD per head); bwd 2.5x fwd (FA2 convention)."""
    fwd = 4.0 * B * H * N * L * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def hbm_bytes(x: dict, mode: str) -> float:
    """Bytes of each input and output moved once (bank counted once, not once per sample)."""
    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    q = x["q"]
    B, H, N, D = q.shape
    ins = sum(size(t) for t in leaves(x)) + size(x["bank_index"])
    o = size(q)  # o has q's shape here
    lse = 4 * B * H * N
    if mode == "fwd":
        return ins + o
    grads = sum(size(t) for t in leaves(x))
    return ins + o + lse + o + grads  # inputs, o (+lse), do, every gradient


# ----------------------------------------------------------------------------------------------
# implementations: each maps inputs -> o
# ----------------------------------------------------------------------------------------------
def concat_sdpa(backend) -> Callable:
    """Literal concatenation [bank[idx] | inst | seq] then SDPA pinned to one backend."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v):
        keys, values = gather_keys(k, v, bank_k, bank_v, bank_index, inst_k, inst_v)
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, keys, values)

    return run


def flex_concat() -> Callable:
    """FlexAttention (compiled) over the concatenated keys; no mask is needed."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, bank_k, bank_v, bank_index, inst_k, inst_v):
        keys, values = gather_keys(k, v, bank_k, bank_v, bank_index, inst_k, inst_v)
        return flex(q, keys, values)

    return run


def implementations() -> dict[str, Callable]:
    from torch.nn.attention import SDPBackend

    impls: dict[str, Callable] = {
        "fused-triton": lambda **x: prompt_attention(**x, impl="triton"),
        "fused-triton-det": lambda **x: prompt_attention(**x, impl="triton", deterministic=True),
    }
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        if hasattr(SDPBackend, name):
            impls[f"concat+sdpa-{name.lower().replace('_attention', '')}"] = concat_sdpa(getattr(SDPBackend, name))
    impls["flex-attention"] = flex_concat()
    impls["torch-path"] = lambda **x: prompt_attention(**x, impl="torch")
    impls["torch-math"] = lambda **x: prompt_attention_math(**x)
    return impls


# ----------------------------------------------------------------------------------------------
# GPU benchmark
# ----------------------------------------------------------------------------------------------
def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def time_modes(fn: Callable, x: dict, warmup: int, rep: int) -> dict[str, object]:
    """Median ms of forward (no grad), backward (retained graph) and forward+backward; an error string
    instead of a time for a mode that fails (e.g. a backend without a backward)."""
    from triton.testing import do_bench

    grads = leaves(x)
    out: dict[str, object] = {}
    with torch.no_grad():
        do = torch.randn_like(fn(**x))
    try:
        with torch.no_grad():
            out["fwd"] = do_bench(lambda: fn(**x), warmup=warmup, rep=rep, return_mode="median")
    except Exception as exc:
        out["fwd"] = _reason(exc)
    try:
        o = fn(**x)
        out["bwd"] = do_bench(lambda: o.backward(do, retain_graph=True), warmup=warmup, rep=rep,
                              grad_to_none=grads, return_mode="median")
        del o
    except Exception as exc:
        out["bwd"] = _reason(exc)
    try:
        out["fwd+bwd"] = do_bench(lambda: fn(**x).backward(do), warmup=warmup, rep=rep, grad_to_none=grads,
                                  return_mode="median")
    except Exception as exc:
        out["fwd+bwd"] = _reason(exc)
    return out


def max_error(fn: Callable, x: dict) -> float:
    """Max |o - o_fp32 reference| on these inputs (sanity check before timing)."""
    with torch.no_grad():
        o = fn(**x).float()
        ref = prompt_attention_math(**{k: (t.float() if t.is_floating_point() else t) for k, t in x.items()})
    return (o - ref).abs().max().item()


def bench_gpu(args: argparse.Namespace) -> dict:
    dtype = DTYPES[args.dtype]
    impls = implementations()
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    rows = []
    for B in args.batch:
        for N in args.tokens:
            x = make_inputs(B, args.heads, N, args.head_dim, args.bank_entries, args.bank_len, args.inst_len,
                            dtype, "cuda")
            L = N + args.bank_len + args.inst_len
            for name, fn in impls.items():
                base = dict(impl=name, B=B, H=args.heads, N=N, S=N, L=L, D=args.head_dim, dtype=args.dtype)
                try:
                    err = max_error(fn, x)
                    times = time_modes(fn, x, args.warmup, args.rep)
                except Exception as exc:  # a backend may not take these shapes/dtype on this GPU
                    err, times = None, {mode: _reason(exc) for mode in MODES}
                for mode in MODES:
                    ms = times[mode]
                    if isinstance(ms, str):
                        rows.append({**base, "mode": mode, "status": "unavailable", "reason": ms})
                        continue
                    nbytes = hbm_bytes(x, mode)
                    bound_ms = nbytes / args.peak_bw * 1e3
                    rows.append({**base, "mode": mode, "status": "ok", "ms": ms, "max_abs_err": err,
                                 "tflops": flops(B, args.heads, N, L, args.head_dim, mode) / ms * 1e-9,
                                 "gbps": nbytes / ms * 1e-6, "hbm_bound_ms": bound_ms,
                                 "x_hbm_bound": ms / bound_ms})
                if all(isinstance(times[m], str) for m in MODES) and len({times[m] for m in MODES}) == 1:
                    summary = f"unavailable ({times['fwd']})"
                else:
                    summary = ", ".join(f"{m} {times[m]:.3f} ms" if not isinstance(times[m], str)
                                        else f"{m} unavailable ({times[m]})" for m in MODES)
                    summary += f" (max err {err:.2e})" if err is not None else ""
                print(f"  {name:28s} B={B} N={N}: {summary}", flush=True)
            del x
            torch.cuda.empty_cache()
    add_speedups(rows)
    return {"device": torch.cuda.get_device_name(), "peak_bw": args.peak_bw, "rows": rows}


def add_speedups(rows: list[dict]) -> None:
    """Each ok row gets fused_speedup = its time / fused-triton time at the same shape and mode."""
    fused = {(r["B"], r["N"], r["mode"]): r["ms"] for r in rows
             if r["impl"] == "fused-triton" and r["status"] == "ok"}
    for r in rows:
        key = (r["B"], r["N"], r["mode"])
        if r["status"] == "ok" and key in fused:
            r["fused_speedup"] = r["ms"] / fused[key]


def print_table(rows: list[dict]) -> None:
    head = (f"{'impl':28s} {'B':>4s} {'N':>4s} {'mode':8s} {'ms':>8s} {'TFLOP/s':>8s} {'GB/s':>7s} "
            f"{'HBM ms':>7s} {'xHBM':>6s} {'fused x':>8s}")
    print(head)
    print("-" * len(head))
    for r in sorted(rows, key=lambda r: (r["B"], r["N"], MODES.index(r["mode"]))):
        if r["status"] != "ok":
            print(f"{r['impl']:28s} {r['B']:4d} {r['N']:4d} {r['mode']:8s} unavailable")
            continue
        print(f"{r['impl']:28s} {r['B']:4d} {r['N']:4d} {r['mode']:8s} {r['ms']:8.3f} {r['tflops']:8.1f} "
              f"{r['gbps']:7.0f} {r['hbm_bound_ms']:7.3f} {r['x_hbm_bound']:6.2f} "
              f"{r.get('fused_speedup', float('nan')):8.2f}")
    print("fused x = this row's time / fused-triton's time (same shape, mode); xHBM = time / HBM bound")


# ----------------------------------------------------------------------------------------------
# CPU: interpreter correctness smoke
# ----------------------------------------------------------------------------------------------
SMOKE = [  # B, H, N, S, M, Pm, Pi, D, broadcast q, dtype
    (2, 2, 17, 23, 2, 16, 16, 64, False, torch.float32),
    (3, 1, 16, 40, 1, 16, 0, 32, True, torch.float32),
    (2, 2, 33, 33, 2, 3, 16, 64, False, torch.float16),
]


def smoke_cpu() -> dict:
    """Fused kernels under TRITON_INTERPRET=1 vs the fp64 reference: max |error| of o and each gradient."""
    os.environ["TRITON_INTERPRET"] = "1"  # read by the dispatch at call time
    results = []
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
    return {"device": f"cpu ({platform.processor() or platform.machine()}), Triton interpreter", "smoke": results}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}; dtype {args.dtype}, H {args.heads}, D {args.head_dim}, "
              f"Pm {args.bank_len} x {args.bank_entries} entries, Pi {args.inst_len}")
        result = bench_gpu(args)
        print()
        print_table(result["rows"])
    else:
        print("No CUDA device: running the Triton-interpreter correctness smoke (max |error| vs fp64).")
        try:
            result = smoke_cpu()
        except Exception:
            traceback.print_exc()
            return 1
        print("Timings need a GPU: run this script on a CUDA machine for the benchmark table.")
    result.update(meta)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
