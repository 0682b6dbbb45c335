"""Fused Triton prompt attention vs an fp64 reference: forward, every gradient, determinism, compile.

On a CPU-only machine the test session imports Triton with TRITON_INTERPRET=1 (tests/conftest.py), so
the real kernels run under the interpreter; with CUDA present they run compiled on the GPU. Short query
sets (N <= 256) take the one-pass backward; the 3-launch backward is checked by forcing it.
Tolerance rule (flash-attention's): |kernel - ref64| <= 2 |torch same dtype - ref64| + floor.
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from mip_dist.kernels import _backend, prompt_attention, prompt_attention_math

from test_kernel_cuda_order import skip_unless_cpu_kernels

# the kernels run where this process's Triton can run them: compiled on a GPU, else interpreted on the CPU
DEVICES = ["cuda"] if torch.cuda.is_available() and not _backend.interpreter_requested() else ["cpu"]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.fixture
def interpret(request):
    """CPU runs need the interpreter chosen before triton was imported (tests/conftest.py does it on a CPU-only
    machine); in a CUDA process, whose kernels run compiled, they skip (a test without a device runs on CPU)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device", "cpu") != "cpu":
        return
    skip_unless_cpu_kernels()
    if not (_backend.interpreter_requested() and _backend.interpreted()):
        pytest.fail("the CPU kernel tests need TRITON_INTERPRET=1 set before triton is imported")


@pytest.fixture
def three_launch(monkeypatch):
    """Force the 3-launch backward (the path for N > 256) at small shapes."""
    mod = _backend.kernel_module()
    original = mod.backward
    monkeypatch.setattr(mod, "backward", lambda *args: original(*args, fused=False))


@dataclass(frozen=True)
class Case:
    """One attention shape: batch, heads, queries, sequence, bank entries/length, instance length."""

    B: int
    H: int
    N: int
    S: int
    M: int
    Pm: Optional[int]  # None: no bank at all
    Pi: Optional[int]  # None: no instance prompts
    D: int
    broadcast_q: bool
    mixed: bool  # bank_index mixes entries (else every sample reads entry M - 1)
    dtype: torch.dtype
    deterministic: bool

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"B{self.B}H{self.H}N{self.N}S{self.S}M{self.M}Pm{self.Pm}Pi{self.Pi}D{self.D}"
                f"{'-bq' if self.broadcast_q else ''}{'-mix' if self.mixed else '-one'}-{dt}"
                f"{'-det' if self.deterministic else ''}")


f32, f16 = torch.float32, torch.float16
# A covering (pairwise-style) set over N, S != N, Pm, Pi, M, bank mix, broadcast q, D, dtype, mode.
CASES = [
    Case(2, 2, 1, 5, 1, 3, None, 32, False, False, f32, False),
    Case(3, 1, 17, 17, 2, 16, 3, 64, True, True, f16, True),
    Case(2, 2, 128, 97, 3, 0, 16, 32, False, True, f32, True),
    Case(3, 2, 211, 211, 3, 3, 3, 64, True, True, f32, False),
    Case(2, 1, 211, 150, 2, 16, 0, 32, False, False, f16, False),
    Case(3, 2, 17, 0, 2, 16, 16, 32, True, True, f32, True),
    Case(1, 2, 128, 128, 1, 16, 16, 64, False, False, f16, True),
    Case(2, 2, 1, 211, 3, None, 3, 64, True, False, f16, False),
    Case(3, 1, 16, 210, 1, 16, None, 64, True, False, f32, True),  # the IPG call: learnable queries
    Case(3, 2, 17, 40, 3, 3, 16, 32, False, True, f16, False),
    Case(2, 1, 128, 33, 2, 0, 3, 64, True, True, f16, True),
    Case(2, 1, 211, 17, 1, 3, 16, 32, False, False, f32, False),
    Case(2, 1, 17, 33, 2, 3, 3, 128, False, True, f16, False),
    Case(2, 1, 5, 9, 2, 16, 3, 16, True, True, f32, True),
]


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    """Random inputs in case.dtype (drawn in fp64 so every dtype sees the same values)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=case.dtype)

    B, H, D = case.B, case.H, case.D
    bank = case.Pm is not None
    inst = case.Pi is not None
    if case.mixed:
        index = torch.arange(B) % case.M
    else:
        index = torch.full((B,), case.M - 1)
    return dict(
        q=rnd(1 if case.broadcast_q else B, H, case.N, D),
        k=rnd(B, H, case.S, D), v=rnd(B, H, case.S, D),
        bank_k=rnd(case.M, H, case.Pm, D) if bank else None,
        bank_v=rnd(case.M, H, case.Pm, D) if bank else None,
        bank_index=index.to(device) if bank else None,
        inst_k=rnd(B, H, case.Pi, D) if inst else None,
        inst_v=rnd(B, H, case.Pi, D) if inst else None,
    )


GRAD_NAMES = ("q", "k", "v", "bank_k", "bank_v", "inst_k", "inst_v")


def run(fn, inputs: dict, do: torch.Tensor, dtype: Optional[torch.dtype] = None, **kw) -> dict:
    """Output and gradients of fn on (a cast copy of) inputs; {'o': ..., 'q': dq, ...}."""
    leaves = {}
    args = {}
    for name, t in inputs.items():
        if t is not None and t.is_floating_point():
            t = t.detach().to(dtype or t.dtype).requires_grad_(True)
            leaves[name] = t
        args[name] = t
    o = fn(**args, **kw)
    grads = torch.autograd.grad(o, list(leaves.values()), do.to(o.dtype), allow_unused=True)
    out = {"o": o.detach()}
    out.update({name: g for name, g in zip(leaves, grads)})
    return out


def assert_close_by_rule(kernel: dict, same_dtype: dict, ref: dict, dtype: torch.dtype, label: str) -> None:
    """Each tensor: kernel error vs fp64 <= 2x the same-dtype PyTorch error + a scaled floor."""
    for name, r in ref.items():
        if r is None or r.numel() == 0:
            continue
        assert kernel[name] is not None, f"{label}: missing gradient {name}"
        assert kernel[name].shape == r.shape, f"{label}: {name} shape {kernel[name].shape} != {r.shape}"
        assert kernel[name].dtype == dtype, f"{label}: {name} dtype {kernel[name].dtype}"
        k_err = (kernel[name].double() - r).abs().max().item()
        t_err = (same_dtype[name].double() - r).abs().max().item()
        bound = 2 * t_err + FLOOR[dtype] * (1 + r.abs().max().item())
        assert k_err <= bound, f"{label}: {name} error {k_err:.3e} > bound {bound:.3e} (torch {t_err:.3e})"


def check_case(case: Case, device: str) -> None:
    inputs = make_inputs(case, device)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(case.B, case.H, case.N, case.D, generator=g, dtype=torch.float64).to(device)
    kernel = run(prompt_attention, inputs, do, impl="triton", deterministic=case.deterministic)
    same = run(prompt_attention_math, inputs, do)
    ref = run(prompt_attention_math, inputs, do, dtype=torch.float64)
    assert_close_by_rule(kernel, same, ref, case.dtype, str(case))


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_gradients_match_fp64(case, device, interpret):
    if device == "cuda":
        torch.cuda.manual_seed(0)
    check_case(case, device)


@pytest.mark.parametrize("case", CASES[1:6] + CASES[8:9], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_three_launch_backward_matches_fp64(case, device, interpret, three_launch):
    check_case(case, device)


@pytest.mark.parametrize("device", DEVICES)
def test_long_query_sets_take_the_three_launch_backward(device, interpret):
    """N > 256 goes to the 3-launch backward (the one-pass kernel keeps one tile's dq per program)."""
    mod = _backend.kernel_module()
    launches = []
    real = mod._launch_backward

    def spy(*args, **kwargs):
        launches.append("3-launch")
        return real(*args, **kwargs)

    mod._launch_backward = spy
    try:
        check_case(Case(1, 1, 257, 20, 2, 3, 16, 16, False, True, torch.float32, False), device)
    finally:
        mod._launch_backward = real
    assert launches == ["3-launch"]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_one_entry_bank_without_index(device, deterministic, interpret):
    """The IPG call: broadcast queries, their own k/v as a one-entry bank read by every sample with no
    index tensor, equal to the same bank selected by an explicit all-zero index."""
    for dtype in (f32, f16):
        case = Case(3, 2, 16, 210, 1, 16, None, 64, True, False, dtype, deterministic)
        inputs = {**make_inputs(case, device), "bank_index": None}
        g = torch.Generator().manual_seed(1)
        do = torch.randn(case.B, case.H, case.N, case.D, generator=g, dtype=torch.float64).to(device)
        kernel = run(prompt_attention, inputs, do, impl="triton", deterministic=deterministic)
        indexed = run(prompt_attention, {**inputs, "bank_index": torch.zeros(3, dtype=torch.long, device=device)},
                      do, impl="triton", deterministic=deterministic)
        ref = run(prompt_attention_math, inputs, do, dtype=torch.float64)
        assert_close_by_rule(kernel, run(prompt_attention_math, inputs, do), ref, dtype, f"{case}-noindex")
        for name in ("o", "q", "bank_k", "bank_v"):
            torch.testing.assert_close(kernel[name], indexed[name], rtol=1e-3 if dtype == f16 else 1e-5, atol=1e-4)


@pytest.mark.skipif(DEVICES != ["cuda"], reason="Triton's interpreter computes bfloat16 dots wrongly")
@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16(device, interpret):
    for case in (Case(2, 2, 17, 30, 2, 16, 3, 64, True, True, torch.bfloat16, False),
                 Case(3, 1, 211, 211, 3, 16, 16, 64, False, True, torch.bfloat16, True)):
        check_case(case, device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_grid_bf16_and_larger():
    for case in CASES:
        check_case(Case(**{**case.__dict__, "dtype": torch.bfloat16}), "cuda")
    check_case(Case(8, 4, 211, 211, 2, 16, 16, 64, False, True, torch.bfloat16, False), "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_bit_identical(device, interpret):
    case = Case(3, 2, 128, 97, 2, 16, 3, 64, True, True, torch.float16, True)
    inputs = make_inputs(case, device)
    do = torch.randn(case.B, case.H, case.N, case.D, dtype=torch.float64).to(device)
    first = run(prompt_attention, inputs, do, impl="triton", deterministic=True)
    again = run(prompt_attention, inputs, do, impl="triton", deterministic=True)
    atomic = run(prompt_attention, inputs, do, impl="triton", deterministic=False)
    for name, t in first.items():
        assert torch.equal(t, again[name]), f"{name} differs between two deterministic runs"
        # the atomic mode only reorders fp32 sums
        torch.testing.assert_close(atomic[name], t, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views_and_expanded_q(device, interpret):
    """q/k/v as permuted views of one packed qkv (the model's layout) and q expanded with stride 0."""
    B, N, H, D, M, P = 2, 33, 2, 32, 2, 16
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(device).requires_grad_(True)
    bank = torch.randn(M, 2, H, P, D, generator=g).to(device).requires_grad_(True)
    queries = torch.randn(1, H, 16, D, generator=g).to(device).requires_grad_(True)
    index = torch.tensor([1, 0], device=device)
    do = torch.randn(B, H, N, D, generator=g).to(device)
    do16 = torch.randn(B, H, 16, D, generator=g).to(device)

    def forward(impl: str):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        o = prompt_attention(q, k, v, bank[:, 0], bank[:, 1], index, impl=impl)
        o2 = prompt_attention(queries.expand(B, -1, -1, -1), k, v, impl=impl)
        grads = torch.autograd.grad((o * do).sum() + (o2 * do16).sum(), [qkv, bank, queries])
        return [o, o2, *grads]

    for got, want in zip(forward("triton"), forward("torch")):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of t whose rows start 4 bytes off a 16-byte boundary (head-dim stride still 1)."""
    buf = torch.zeros(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("fused", [True, False], ids=["one-pass", "3-launch"])
def test_one_key_loop_and_per_group_loops_agree(interpret, fused, monkeypatch):
    """Aligned rows take the one key loop over [seq | bank | inst] (forward, dq); misaligned ones per-group loops."""
    mod = _backend.kernel_module()
    B, H, N, S, M, Pm, Pi, D = 2, 2, 23, 37, 2, 5, 16, 32
    g = torch.Generator().manual_seed(7)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    x = dict(q=r(B, H, N, D), k=r(B, H, S, D), v=r(B, H, S, D), bank_k=r(M, H, Pm, D), bank_v=r(M, H, Pm, D),
             bank_index=torch.tensor([1, 0]), inst_k=r(B, H, Pi, D), inst_v=r(B, H, Pi, D))
    groups = ("k", "v", "bank_k", "bank_v", "inst_k", "inst_v")
    bad = {**x, **{name: _misaligned(x[name]) for name in ("bank_k", "inst_v")}}
    def one_loop(inputs: dict) -> bool:
        tensors = tuple(inputs[n] for n in groups)
        return mod._one_loop_ok(tensors, tuple(t.stride() for t in tensors))

    assert one_loop(x) and not one_loop(bad)
    original = mod.backward
    monkeypatch.setattr(mod, "backward", lambda *args: original(*args, fused=fused))
    do = r(B, H, N, D)

    def run(inputs: dict, impl: str) -> list[torch.Tensor]:
        # detach keeps the storage offset: the misaligned rows stay misaligned
        leaves = {n: t.detach().requires_grad_(True) if t.is_floating_point() else t for n, t in inputs.items()}
        o = prompt_attention(**leaves, impl=impl)
        grads = torch.autograd.grad(o, [leaves[n] for n in ("q", *groups)], do)
        return [o, *grads]

    want = run(x, "torch")
    for inputs in (x, bad):
        for got, ref in zip(run(inputs, "triton"), want):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(interpret, backend):
    """The custom ops trace without graph breaks (fake-tensor shapes, autograd formula) and run compiled."""
    case = Case(2, 2, 17, 20, 2, 3, 16, 32, True, True, torch.float32, False)
    inputs = make_inputs(case, "cpu")
    do = torch.randn(case.B, case.H, case.N, case.D, dtype=torch.float64)

    def attention(**kw):
        return prompt_attention(**kw, impl="triton") * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True, backend=backend)
    got = run(compiled, inputs, do)
    want = run(attention, inputs, do)
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=1e-6, atol=1e-6)
    if backend != "aot_eager":
        return
    eager_torch = run(lambda **kw: prompt_attention(**kw, impl="torch") * 2.0, inputs, do)
    compiled_torch = run(torch.compile(lambda **kw: prompt_attention(**kw, impl="torch") * 2.0,
                                       fullgraph=True, backend="aot_eager"), inputs, do)
    for name, t in eager_torch.items():
        torch.testing.assert_close(compiled_torch[name], t)
        torch.testing.assert_close(got[name], t, rtol=1e-4, atol=1e-5)


def test_compiled_graph_calls_the_custom_op(interpret):
    """Under torch.compile the Triton path is the opaque mip_dist custom op (not traced Python)."""
    inputs = make_inputs(Case(2, 1, 17, 5, 2, 3, 3, 32, False, True, torch.float32, False), "cpu")
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda **kw: prompt_attention(**kw, impl="triton"), fullgraph=True, backend=record)(**inputs)
    assert len(graphs) == 1 and "mip_dist.prompt_attention_fwd" in graphs[0]


@pytest.mark.parametrize("B, N, S", [(2, 0, 5), (0, 3, 5), (2, 3, 0)], ids=["no-queries", "no-samples", "no-seq"])
def test_empty_dimensions(B, N, S, interpret):
    """Zero queries or samples give empty outputs and zero prompt gradients; an empty sequence is fine."""
    g = torch.Generator().manual_seed(0)
    x = dict(q=torch.randn(B, 2, N, 32, generator=g), k=torch.randn(B, 2, S, 32, generator=g),
             v=torch.randn(B, 2, S, 32, generator=g), bank_k=torch.randn(2, 2, 3, 32, generator=g),
             bank_v=torch.randn(2, 2, 3, 32, generator=g), bank_index=torch.arange(B) % 2)
    do = torch.randn(B, 2, N, 32, generator=g)
    got = run(prompt_attention, x, do, impl="triton")
    want = run(prompt_attention, x, do, impl="torch")
    for name, t in want.items():
        assert got[name].shape == t.shape, name
        torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(DEVICES != ["cpu"], reason="the interpreter's limits only")
def test_bfloat16_on_the_cpu_falls_back_to_torch(interpret):
    """The interpreter's bf16 dot is wrong: auto runs the PyTorch path, a forced impl='triton' says why."""
    inputs = make_inputs(Case(2, 1, 17, 9, 2, 3, 3, 32, False, True, torch.bfloat16, False), "cpu")
    o = prompt_attention(**inputs)
    torch.testing.assert_close(o, prompt_attention_math(**inputs), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="bfloat16 on the CPU"):
        prompt_attention(**inputs, impl="triton")


def test_the_interpreter_launches_the_fixed_config(interpret):
    """Autotuning needs compiled kernels on a GPU: interpreted kernels take the fixed config even for a CUDA q."""
    mod = _backend.kernel_module()
    cuda_q = types.SimpleNamespace(device=torch.device("cuda"))
    assert not mod._tune(cuda_q, False) and not mod._tune(cuda_q, True)


@pytest.mark.parametrize("pick", [1, 2, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_every_autotune_candidate_computes_the_same_attention(pick, device, monkeypatch, interpret):
    """The 16-bit candidates (any of which autotuning may pick on a GPU) run here as the fixed config:
    forward and all gradients vs fp64, on the one-pass (block and IPG shape) and 3-launch backward."""
    from mip_dist.kernels import _configs

    mod = _backend.kernel_module()
    row = _configs._CONFIGS[(True, False)]
    for name, extra in _configs._CANDIDATES[(True, False)].items():
        monkeypatch.setitem(row, name, extra[min(pick, len(extra)) - 1])
    monkeypatch.setattr(_configs, "_PARAMS_CACHE", {})
    monkeypatch.setattr(mod, "_tune", lambda q, deterministic: False)  # on a GPU too: this candidate only
    block = Case(2, 1, 70, 50, 2, 16, 3, 64, False, True, f16, False)
    ipg = Case(3, 1, 16, 40, 1, 16, None, 64, True, False, f16, False)
    check_case(block, device)
    check_case(ipg, device)
    original = mod.backward
    monkeypatch.setattr(mod, "backward", lambda *args: original(*args, fused=False))
    check_case(block, device)


@pytest.mark.parametrize("fused", [True, False], ids=["one-pass", "3-launch"])
@pytest.mark.parametrize("device", DEVICES)
def test_scores_far_below_zero_give_finite_gradients(device, fused, interpret, monkeypatch):
    """Every score of a row near -200 (lse2 < -128): a padded key row's exp2(0 - lse2) overflows to inf, and
    inf times its zero k row is NaN in dq unless P stays finite there (20 keys in a 32-wide key block)."""
    mod = _backend.kernel_module()
    original = mod.backward
    monkeypatch.setattr(mod, "backward", lambda *args: original(*args, fused=fused))
    B, H, N, S, D = 2, 2, 10, 20, 32
    g = torch.Generator().manual_seed(11)
    u = torch.full((D,), D ** -0.5)
    a = (200.0 / D ** -0.5) ** 0.5  # q . k * scale = -a^2 * scale = -200 (base 2: about -289)
    x = dict(q=(a * u + 0.1 * torch.randn(B, H, N, D, generator=g)).to(device),
             k=(-a * u + 0.1 * torch.randn(B, H, S, D, generator=g)).to(device),
             v=torch.randn(B, H, S, D, generator=g).to(device))
    do = torch.randn(B, H, N, D, generator=g).to(device)
    got = run(prompt_attention, x, do, impl="triton")
    want = run(prompt_attention, x, do, impl="torch")
    for name, t in want.items():
        assert torch.isfinite(t).all(), f"the reference {name} is not finite"
        bad = (~torch.isfinite(got[name])).sum().item()
        assert bad == 0, f"{name}: {bad} of {t.numel()} entries not finite"
        torch.testing.assert_close(got[name], t, rtol=1e-4, atol=1e-4)


CUDA_GRID_X_MAX = 2**31 - 1
CUDA_GRID_YZ_MAX = 65_535


def _grid_ok(grid: tuple) -> bool:
    """Within CUDA's launch limits: axis x up to 2**31 - 1, axes y and z up to 65,535."""
    return 1 <= len(grid) <= 3 and grid[0] <= CUDA_GRID_X_MAX and all(g <= CUDA_GRID_YZ_MAX for g in grid[1:])


@pytest.mark.parametrize("tiles", [1, 65_535, 65_536, 12 * 8192])
def test_grid_helpers_put_samples_times_heads_on_axis_x(tiles):
    """B*H past 65,535 (a batch of 8192 at 12 heads) fits: the tile count multiplies axis x only."""
    mod = _backend.kernel_module()
    for grid, blocks in ((mod.query_grid(tiles, 211, 64), 4), (mod.tile_grid(tiles, 6), 6)):
        assert _grid_ok(grid), grid
        assert math.prod(grid) == tiles * blocks, grid


@pytest.mark.parametrize("fused", [True, False], ids=["one-pass", "3-launch"])
def test_launches_at_more_than_65535_samples_times_heads_fit_the_grid_limits(fused):
    """Every launch the host makes at B*H = 66,000 (kernels stubbed: the grids only) stays within CUDA's grid
    limits and gives every (sample, head) tile a program."""
    from mip_dist.kernels import _introspect

    mod = _backend.kernel_module()
    case = dict(B=33_000, H=2, N=1, S=3, D=16, M=2, Pm=2, Pi=1, broadcast_q=False, indexed=True)
    launches = _introspect.record_launches(mod, case, dtype=torch.float32, fused=fused)
    names = [launch.name for launch in launches]
    assert names == (["_fwd_kernel", "_bwd_fused_kernel"] if fused else
                     ["_fwd_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel", "_bwd_kv_kernel"])
    for launch in launches:
        grid = launch.grid(launch.kwargs) if callable(launch.grid) else launch.grid
        assert _grid_ok(grid), f"{launch.name}: grid {grid} exceeds CUDA's limits"
        if launch.name != "_bwd_fused_kernel":  # the one-pass backward is persistent: programs loop over tiles
            assert math.prod(grid) >= 33_000 * 2, (launch.name, grid)
