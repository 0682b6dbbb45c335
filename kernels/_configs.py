"""Launch configurations of the attention kernels: the fixed config per shape, and the autotune candidates.

The fixed config (`_CONFIGS`) is what deterministic runs, the interpreter and the compile-facts table
use. On a GPU, non-deterministic launches of the forward, the one-pass backward and the dq backward
pick among `_CANDIDATES` with `triton.autotune`, keyed on the lengths and flags of the call (Triton adds
the tensors' dtypes to the key). Only the 16-bit, head dim <= 64 class (the paper's) has more than
one candidate, and each of them is held by tests/test_kernel_compile.py to the fixed config's targets
at the paper and IPG shapes (0 spills, >= 2 CTAs/SM on sm_90, wgmma where a block has 64 rows).
The dk/dv kernel of the 3-launch backward keeps its fixed config: its grid and block counts are
host arguments derived from the block sizes, which an autotuner config cannot change.
"""
from __future__ import annotations

import torch

from ._fwd_kernels import MIN_BLOCK
TUNED = ("BLOCK_M", "BLOCK_N", "BLOCK_PM", "BLOCK_PI", "num_warps", "num_stages")  # what a candidate sets

Config = tuple[int, int, int, int]  # (BLOCK_M, BLOCK_N, num_warps, num_stages)

# (16-bit inputs, head dim > 64) -> {kernel: config}. The 16-bit D <= 64 row is the production one,
# held by tests/test_kernel_compile.py to 0 spills, >= 2 CTAs/SM and wgmma on sm_90 with the JIT's
# real specialization; the interpreter ignores warps and stages.
_CONFIGS: dict[tuple[bool, bool], dict[str, Config]] = {
    (True, False): {"fwd": (64, 64, 4, 3), "dq": (64, 64, 8, 2), "kv": (64, 64, 4, 2), "fused": (64, 32, 4, 2),
                    "fused_short": (16, 16, 4, 2)},
    (True, True): {"fwd": (64, 64, 8, 2), "dq": (32, 32, 8, 2), "kv": (32, 32, 8, 2), "fused": (32, 32, 8, 2),
                   "fused_short": (16, 16, 8, 2)},
    (False, False): {"fwd": (64, 32, 8, 2), "dq": (64, 32, 8, 2), "kv": (64, 32, 8, 2), "fused": (64, 32, 8, 2),
                     "fused_short": (16, 16, 4, 2)},
    (False, True): {"fwd": (32, 32, 8, 2), "dq": (32, 32, 8, 2), "kv": (32, 32, 8, 2), "fused": (32, 32, 8, 2),
                    "fused_short": (16, 16, 8, 2)},
}
# Extra autotune candidates (the fixed config is always the first); sm_90 facts at the paper shape
# (regs / smem KB / CTAs per SM), from `python -m mip_dist.kernels._introspect --candidates`
_CANDIDATES: dict[tuple[bool, bool], dict[str, tuple[Config, ...]]] = {
    (True, False): {
        "fwd": ((64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3)),  # 136/41/3, 95/33/5, 121/65/2
        "dq": ((64, 64, 4, 2), (64, 32, 4, 3)),  # 132/49/3, 96/41/5
        "fused": ((64, 32, 4, 3), (32, 32, 4, 2)),  # 255/46/2, 251/19/2
        "fused_short": ((16, 32, 4, 2),),  # IPG: 254/15/2
    },
}
RESET: dict[str, tuple[str, ...]] = {  # outputs a kernel accumulates into: zeroed before each timed trial
    "fwd": (), "dq": ("DQ",), "fused": ("DQ", "DBK", "DBV")}
KEY: dict[str, tuple[str, ...]] = {  # autotune key: the call's lengths and binary-changing flags
    "fwd": ("N", "S", "PM", "PI", "BLOCK_D", "BANK_SHARED", "ONE_LOOP"),
    "dq": ("N", "S", "PM", "PI", "BLOCK_D", "ATOMIC", "BANK_SHARED", "ONE_LOOP"),
    "fused": ("N", "S", "PM", "PI", "BLOCK_D", "ATOMIC_DQ", "BANK_ATOMIC", "BANK_SHARED", "ALIGNED"),
}


def pow2_block(length: int, cap: int) -> int:
    """Smallest power of two >= length, clamped to [MIN_BLOCK, cap]."""
    return max(MIN_BLOCK, min(cap, 1 << (max(length, 1) - 1).bit_length()))


def config_name(kernel: str, n: int) -> str:
    """The config row of `kernel` for n queries: one 16-row query block (the IPG) has its own one-pass row."""
    return "fused_short" if kernel == "fused" and n <= MIN_BLOCK else kernel


def params_of(kernel: str, config: Config, dtype: torch.dtype, n: int, s: int, pm: int, pi: int,
              d: int) -> dict:
    """Launch kwargs of one config for these lengths: blocks clamped to the lengths, compile options."""
    block_m, block_n, warps, stages = config
    params = dict(BLOCK_M=pow2_block(n, block_m), BLOCK_D=d, num_warps=warps, num_stages=stages,
                  DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32")
    if kernel == "fused":  # one virtual key index over [seq | bank | inst]
        params["BLOCK_N"] = pow2_block(s + pm + pi, block_n)
    else:
        params.update(BLOCK_N=pow2_block(s, block_n), BLOCK_PM=pow2_block(pm, block_n),
                      BLOCK_PI=pow2_block(pi, block_n))
    return params


def _class(dtype: torch.dtype, d: int) -> tuple[bool, bool]:
    return dtype != torch.float32, d > 64


_PARAMS_CACHE: dict[tuple, dict] = {}  # (kernel, dtype, n, s, pm, pi, d) -> fixed launch parameters
_CANDIDATE_CACHE: dict[tuple, tuple[dict, ...]] = {}


def launch_params(kernel: str, dtype: torch.dtype, n: int, s: int, pm: int, pi: int, d: int) -> dict:
    """The fixed config's launch kwargs of `kernel` ('fwd', 'dq', 'kv', 'fused') for these lengths, cached
    (callers must not mutate the dict)."""
    key = (kernel, dtype, n, s, pm, pi, d)
    params = _PARAMS_CACHE.get(key)
    if params is None:
        config = _CONFIGS[_class(dtype, d)][config_name(kernel, n)]
        params = _PARAMS_CACHE[key] = params_of(kernel, config, dtype, n, s, pm, pi, d)
    return params


def candidate_params(kernel: str, dtype: torch.dtype, n: int, s: int, pm: int, pi: int, d: int) -> tuple[dict, ...]:
    """Distinct launch kwargs of the fixed config and the autotune candidates for these lengths (fixed first;
    candidates that clamp to the same blocks are dropped), cached."""
    key = (kernel, dtype, n, s, pm, pi, d)
    found = _CANDIDATE_CACHE.get(key)
    if found is None:
        name = config_name(kernel, n)
        extra = _CANDIDATES.get(_class(dtype, d), {}).get(name, ()) if kernel in KEY else ()
        out: list[dict] = []
        for config in (_CONFIGS[_class(dtype, d)][name], *extra):
            params = params_of(kernel, config, dtype, n, s, pm, pi, d)
            if params not in out:
                out.append(params)
        found = _CANDIDATE_CACHE[key] = tuple(out)
    return found


_TUNERS: dict[tuple, object] = {}


def autotuner(kernel: str, fn: object, candidates: tuple[dict, ...]) -> object:
    """A `triton.autotune` wrapper of the JIT function `fn` over `candidates`, one per candidate list."""
    import triton

    key = (kernel, id(fn), tuple(tuple(sorted(c.items())) for c in candidates))
    tuner = _TUNERS.get(key)
    if tuner is None:
        configs = [triton.Config({k: v for k, v in c.items() if k in TUNED and not k.startswith("num_")},
                                 num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in candidates]
        tuner = _TUNERS[key] = triton.autotune(configs=configs, key=list(KEY[kernel]),
                                               reset_to_zero=list(RESET[kernel]))(fn)
    return tuner


_TUNED_CHOICE: dict[tuple, tuple[object, dict]] = {}  # the autotuned launches' (tuner, kwargs), per call signature


def choose(kernel: str, fn: object, dtype: torch.dtype, n: int, s: int, pm: int, pi: int, d: int,
           tune: bool) -> tuple[object, dict]:
    """(what to launch, its kwargs): the autotuner and the untuned kwargs when `tune` and the shape has more
    than one candidate, else `fn` and the fixed config's kwargs. Runs on every launch, so the tuned choice
    is cached per call signature (building the tuner's key costs microseconds)."""
    fixed = launch_params(kernel, dtype, n, s, pm, pi, d)
    if not tune:
        return fn, fixed
    key = (kernel, id(fn), dtype, n, s, pm, pi, d)
    found = _TUNED_CHOICE.get(key)
    if found is None:
        candidates = candidate_params(kernel, dtype, n, s, pm, pi, d)
        found = _TUNED_CHOICE[key] = ((fn, fixed) if len(candidates) == 1 else
                                      (autotuner(kernel, fn, candidates),
                                       {k: v for k, v in fixed.items() if k not in TUNED}))
    return found
