"""prompt_attention dispatch (auto / triton / torch) and the input checks that run before any launch."""
from __future__ import annotations

import pytest
import torch

import mip_dist.kernels as kernels
from mip_dist.kernels import check_inputs, prompt_attention, prompt_attention_math, resolve_impl

from test_kernel_cuda_order import skip_unless_cpu_kernels


def inputs(B=2, H=2, N=5, S=7, M=2, Pm=3, Pi=4, D=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(q=r(B, H, N, D), k=r(B, H, S, D), v=r(B, H, S, D), bank_k=r(M, H, Pm, D),
                bank_v=r(M, H, Pm, D), bank_index=torch.arange(B) % M, inst_k=r(B, H, Pi, D),
                inst_v=r(B, H, Pi, D))


@pytest.fixture
def spy(monkeypatch):
    """Record which implementation prompt_attention calls."""
    calls = []
    real_triton, real_torch = kernels.prompt_attention_triton, kernels.prompt_attention_torch

    def triton_path(*a, **kw):
        calls.append("triton")
        return real_triton(*a, **kw)

    def torch_path(*a, **kw):
        calls.append("torch")
        return real_torch(*a, **kw)

    monkeypatch.setattr(kernels, "prompt_attention_triton", triton_path)
    monkeypatch.setattr(kernels, "prompt_attention_torch", torch_path)
    return calls


def test_auto_on_cpu_without_interpreter_uses_torch(spy, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = inputs()
    o = prompt_attention(**x)
    assert spy == ["torch"]
    torch.testing.assert_close(o, prompt_attention_math(**x))


def test_auto_never_picks_the_interpreter(spy, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # inherited by every subprocess a CPU test session starts
    x = inputs()
    o = prompt_attention(**x)
    assert spy == ["torch"]  # the interpreter is orders of magnitude slower than PyTorch on a CPU
    torch.testing.assert_close(o, prompt_attention_math(**x))


def test_forced_triton_runs_interpreted_on_cpu(spy, monkeypatch):
    skip_unless_cpu_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = inputs()
    torch.testing.assert_close(prompt_attention(**x, impl="triton"), prompt_attention_math(**x))
    assert spy == ["triton"]


def test_auto_falls_back_to_torch_for_what_triton_lacks(spy, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    prompt_attention(**inputs(D=24))  # head dim the kernels do not take
    prompt_attention(**inputs(dtype=torch.float64))
    assert spy == ["torch", "torch"]


def test_forced_torch_never_calls_triton(spy, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    prompt_attention(**inputs(), impl="torch")
    assert spy == ["torch"]


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        prompt_attention(**inputs(), impl="triton")


@pytest.mark.parametrize("kw, match", [
    (dict(D=24), "head dim 24"),
    (dict(dtype=torch.float64), "float64"),
])
def test_forced_triton_rejects_unsupported_input(monkeypatch, kw, match):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=match):
        prompt_attention(**inputs(**kw), impl="triton")


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve_impl("flash", torch.zeros(1, 1, 1, 32))


def _with(**changes):
    x = inputs()
    x.update(changes)
    return x


BAD = [
    ("q rank", lambda: _with(q=torch.zeros(2, 5, 32)), "must be \\[B, H, N, D\\]"),
    ("k vs v", lambda: _with(v=torch.zeros(2, 2, 6, 32)), "differ"),
    ("q batch", lambda: _with(q=torch.zeros(3, 2, 5, 32)), "q batch must be 1 or 2"),
    ("dtype mix", lambda: _with(k=torch.zeros(2, 2, 7, 32, dtype=torch.float16)), "k is torch.float16"),
    ("int q", lambda: {**_with(), "q": torch.zeros(2, 2, 5, 32, dtype=torch.int32)}, "floating-point"),
    ("bank half", lambda: _with(bank_v=None), "bank_k and bank_v"),
    ("bank heads", lambda: _with(bank_k=torch.zeros(2, 3, 3, 32), bank_v=torch.zeros(2, 3, 3, 32)), "bank_k/bank_v"),
    ("empty bank", lambda: _with(bank_k=torch.zeros(0, 2, 3, 32), bank_v=torch.zeros(0, 2, 3, 32)), "M >= 1"),
    ("index missing", lambda: _with(bank_index=None), "bank_index is required for a bank of"),
    ("index float", lambda: _with(bank_index=torch.zeros(2)), "bank_index must be an int tensor"),
    ("index high", lambda: _with(bank_index=torch.tensor([0, 2])), "in \\[0, 2\\); got min 0, max 2"),
    ("index low", lambda: _with(bank_index=torch.tensor([-1, 0])), "got min -1"),
    ("inst half", lambda: _with(inst_k=None), "inst_k and inst_v"),
    ("inst batch", lambda: _with(inst_k=torch.zeros(1, 2, 4, 32), inst_v=torch.zeros(1, 2, 4, 32)), "inst_k/inst_v"),
    ("no keys", lambda: _with(k=torch.zeros(2, 2, 0, 32), v=torch.zeros(2, 2, 0, 32), bank_k=None, bank_v=None,
                              bank_index=None, inst_k=None, inst_v=None), "no keys"),
]


@pytest.mark.parametrize("name, make, match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("impl", ["torch", "triton", "auto"])
def test_bad_inputs_raise_value_error_before_launch(monkeypatch, impl, name, make, match):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=match):
        prompt_attention(**make(), impl=impl)


def test_check_inputs_accepts_optional_groups_and_broadcast_q():
    x = inputs()
    check_inputs(x["q"][:1], x["k"], x["v"], None, None, None, None, None)
    check_inputs(x["q"], x["k"][:, :, :0], x["v"][:, :, :0], x["bank_k"], x["bank_v"], x["bank_index"].int(),
                 None, None)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        prompt_attention(**inputs(), scale=scale, impl="torch")


def test_explicit_scale_is_used(monkeypatch):
    skip_unless_cpu_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = inputs()
    want = prompt_attention_math(**x, scale=0.3)
    torch.testing.assert_close(prompt_attention(**x, scale=0.3, impl="triton"), want)
    torch.testing.assert_close(prompt_attention(**x, scale=0.3, impl="torch"), want)


def test_index_range_is_rechecked_after_in_place_change():
    x = inputs()
    prompt_attention(**x, impl="torch")
    x["bank_index"][1] = 5
    with pytest.raises(ValueError, match="max 5"):
        prompt_attention(**x, impl="torch")


def test_one_entry_bank_needs_no_index():
    x = _with(bank_k=inputs()["bank_k"][:1], bank_v=inputs()["bank_v"][:1], bank_index=None)
    want = prompt_attention_math(**{**x, "bank_index": torch.zeros(2, dtype=torch.long)})
    torch.testing.assert_close(prompt_attention(**x, impl="torch"), want)


def test_an_interpreter_that_cannot_run_the_kernels_is_a_clear_error(monkeypatch):
    """triton < 3.7 under NumPy >= 2.4 fails inside the interpreter (int() of a one-element array): a forced
    impl='triton' on CPU tensors says so up front; auto keeps taking the PyTorch path."""
    triton = pytest.importorskip("triton")
    import numpy

    from mip_dist.kernels import _backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    _backend.interpreter_defect.cache_clear()
    monkeypatch.setattr(_backend, "interpreted", lambda: True)  # as in the CPU session: not the check here
    try:
        with pytest.raises(ValueError, match="triton 3.6.0's interpreter cannot read loop bounds under NumPy 2.4.0"):
            prompt_attention(**inputs(), impl="triton")
        torch.testing.assert_close(prompt_attention(**inputs()), prompt_attention_math(**inputs()))
        monkeypatch.setattr(numpy, "__version__", "2.3.5")
        _backend.interpreter_defect.cache_clear()
        assert _backend.interpreter_defect() is None
    finally:
        _backend.interpreter_defect.cache_clear()
