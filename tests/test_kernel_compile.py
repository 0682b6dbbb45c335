"""The kernels compile for Hopper (sm_90) through Triton's NVIDIA backend and ptxas, without a GPU.

The interpreter accepts code that the compiler rejects (e.g. a variable whose block shape differs
between the branches of an `if`), so CPU-only CI also compiles every kernel for the GPU. The launches
compiled are the ones the host code makes (kernels stubbed, arguments recorded) at the paper and IPG
shapes, specialised by the JIT's own binder; the binaries must not spill, must fit >= 2 CTAs per SM
and must use wgmma where the block allows it. Run with -s to see the measured table.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")
from mip_dist.kernels import _backend, _introspect  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
CUOBJDUMP = os.path.join(os.path.dirname(PTXAS), "cuobjdump")
pytestmark = [
    pytest.mark.skipif(not (os.path.exists(PTXAS) and os.path.exists(CUOBJDUMP)),
                       reason="triton's bundled ptxas / cuobjdump is missing"),
    pytest.mark.skipif(_backend.interpreter_requested(),
                       reason="TRITON_INTERPRET=1 for the whole process: triton's own helpers are interpreted"),
]


def _module():
    """The compiled-mode kernel module (its launchers run with the kernels stubbed out)."""
    return _backend.kernel_module(torch.device("cuda"))


@pytest.fixture(scope="module")
def measured():
    """(case, launch, facts, compiled) of every distinct launch at the paper and IPG shapes."""
    rows, seen = [], set()
    for case in ("paper", "ipg"):
        for deterministic in (False, True):
            for launch in _introspect.record_launches(_module(), case, deterministic):
                key = (case, _introspect.label(launch))
                if key not in seen:
                    seen.add(key)
                    compiled = _introspect.compile_launch(launch)
                    rows.append((case, launch, _introspect.facts(compiled), compiled))
    print("\n" + _introspect.table([r[:3] for r in rows]))  # the docstring table (pytest -s shows it)
    return rows


def test_every_launch_meets_the_sm90_targets(measured):
    """0 spills, >= 2 CTAs/SM from registers and smem, wgmma wherever a 64-row block allows it."""
    bad = {f"{case} {_introspect.label(launch)}": _introspect.problems(f, _introspect.wgmma_expected(launch))
           for case, launch, f, _ in measured}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"{bad}\n{_introspect.table([r[:3] for r in measured])}"


def test_launches_are_specialised_like_the_jit(measured):
    """Stride-1 arguments are constexprs and 16-divisible ones carry the alignment hint in the binary."""
    for case, launch, _, compiled in measured:
        assert compiled.src.constants, f"{case} {launch.name}: no stride specialised to 1"
        assert any(attr for attr in compiled.src.attrs.values()), f"{case} {launch.name}: no divisibility hints"


def test_paper_and_ipg_shapes_are_both_measured(measured):
    names = {(case, launch.name) for case, launch, _, _ in measured}
    for case in ("paper", "ipg"):
        assert {(case, k) for k in _introspect.KERNELS} <= names
    ipg = [launch for case, launch, _, _ in measured if case == "ipg" and launch.name != "_bwd_delta_kernel"]
    assert all(launch.kwargs["BANK_SHARED"] for launch in ipg), "IPG launches must take the no-index bank path"


def test_bank_gradient_atomics_are_relaxed_reductions(measured):
    """Relaxed fp32 atomics compile to REDG with no GPU-scope fence or L1 invalidate around them."""
    atomic = [(case, launch, c) for case, launch, _, c in measured
              if launch.kwargs.get("BANK_ATOMIC") or launch.kwargs.get("ATOMIC")]
    assert atomic
    for case, launch, compiled in atomic:
        ptx_atomics = re.findall(r"\b(?:red|atom)\.[\w.]+", compiled.asm["ptx"])
        assert ptx_atomics and all(".relaxed." in a for a in ptx_atomics), (case, launch.name, ptx_atomics)
        sass = _introspect.sass(compiled)
        assert re.search(r"\bREDG\.", sass), (case, launch.name, "no REDG")
        for barrier in ("MEMBAR.ALL.GPU", "MEMBAR.SC", "CCTL.IVALL", "ATOMG."):
            assert barrier not in sass, (case, launch.name, barrier)


def test_docstring_table_is_the_measured_one(measured):
    """The table in the kernel module's docstring is regenerated from this test's output, not by hand."""
    want = _introspect.table([r[:3] for r in measured])
    assert want in _module().__doc__, f"update the table in kernels/_triton_attention.py:\n{want}"


@pytest.mark.parametrize("kernel", ["_fwd_kernel", "_bwd_dq_kernel"])
def test_one_loop_and_its_per_group_fallback_meet_the_targets(kernel):
    """Aligned rows launch one key loop (pipelined: cp.async); misaligned ones the per-group loops."""
    launch = next(l for l in _introspect.record_launches(_module(), "paper") if l.name == kernel)
    assert launch.kwargs["ONE_LOOP"]
    for one_loop in (True, False):
        launch.kwargs["ONE_LOOP"] = one_loop
        compiled = _introspect.compile_launch(launch)
        assert not _introspect.problems(_introspect.facts(compiled), True), one_loop
        assert "cp.async" in compiled.asm["ptx"], f"{kernel} ONE_LOOP={one_loop}: K/V loads not pipelined"


@pytest.mark.parametrize("kernel, config, symptom", [
    ("_bwd_kv_kernel", (64, 64, 8, 2), "CTA/SM"),  # the former kv config: 159 registers x 8 warps
    ("_fwd_kernel", (128, 128, 4, 3), "spills"),  # an oversized forward tile
])
def test_a_bad_config_fails_the_targets(monkeypatch, kernel, config, symptom):
    """The check bites: a config that misses a target is reported with the reason."""
    mod = _module()
    name = {"_bwd_kv_kernel": "kv", "_fwd_kernel": "fwd"}[kernel]
    monkeypatch.setitem(mod._CONFIGS, (True, False), {**mod._CONFIGS[(True, False)], name: config})
    monkeypatch.setattr(mod, "_PARAMS_CACHE", {})
    launch = next(l for l in _introspect.record_launches(mod, "paper") if l.name == kernel)
    found = _introspect.problems(_introspect.facts(_introspect.compile_launch(launch)), True)
    assert any(symptom in p for p in found), found


@pytest.mark.parametrize("dtype, d", [(torch.float16, 128), (torch.float32, 32), (torch.bfloat16, 16)])
def test_other_dtypes_and_head_dims_compile(dtype, d):
    """Odd lengths (a 3-key sequence, 3 bank keys, no instance prompts) compile in every dtype/head dim."""
    case = dict(B=2, H=2, N=17, S=3, D=d, M=2, Pm=3, Pi=0, broadcast_q=False, indexed=True)
    for launch in _introspect.record_launches(_module(), case, dtype=dtype):
        _introspect.compile_launch(launch)
