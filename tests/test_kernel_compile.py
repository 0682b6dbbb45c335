"""The kernels compile for Hopper (sm_90) through Triton's NVIDIA backend and ptxas, without a GPU.

The interpreter accepts code that the compiler rejects (e.g. a variable whose block shape differs
between the branches of an `if`), so CPU-only CI also compiles every kernel for the GPU. The launches
compiled are the ones the host code makes (kernels stubbed, arguments recorded) at the paper and IPG
shapes, specialised by the JIT's own binder; the binaries must not spill, must fit >= 2 CTAs per SM
and must use wgmma where the block allows it; so must every autotune candidate. Triton picks interpreted or compiled kernels when it is
imported, and the test session runs interpreted (TRITON_INTERPRET=1), so the compiler runs in a child
process without the interpreter. Register counts depend on the Triton release: the docstring table and
the register/spill targets are held only on the release they were measured with (MEASURED_WITH; on
triton 3.6 the paper one-pass backward reaches 255 registers and spills 8 bytes per thread).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
CUOBJDUMP = os.path.join(os.path.dirname(PTXAS), "cuobjdump")
pytestmark = pytest.mark.skipif(not (os.path.exists(PTXAS) and os.path.exists(CUOBJDUMP)),
                                reason="triton's bundled ptxas / cuobjdump is missing")
MEASURED_WITH = "3.8"  # the triton release of the docstring table and of the configs' register budgets
measured_release = pytest.mark.skipif(
    triton.__version__.split(".")[:2] != MEASURED_WITH.split("."),
    reason=f"register and spill counts are triton {MEASURED_WITH}'s (the table and configs were measured "
           f"with it); triton {triton.__version__} allocates registers differently")


def compiled(code: str):
    """Run `code` (which prints one JSON value) with compiled, not interpreted, Triton kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    prelude = "import json, torch\nfrom mip_dist.kernels import _backend, _introspect\nmod = _backend.kernel_module()\n"
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured() -> dict:
    """The table and per-launch facts of every distinct launch at the paper and IPG shapes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "mip_dist.kernels._introspect", "--json"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    print("\n" + result["table"])  # the docstring table (pytest -s shows it)
    return result


@measured_release
def test_every_launch_meets_the_sm90_targets(measured):
    """0 spills, >= 2 CTAs/SM from registers and smem, wgmma wherever a 64-row block allows it."""
    bad = {f"{r['case']} {r['label']}": r["problems"] for r in measured["rows"] if r["problems"]}
    assert not bad, f"{bad}\n{measured['table']}"


def test_the_one_pass_backward_is_what_short_sequences_launch(measured):
    """The paper and IPG shapes (N <= 256) launch one backward kernel; the 3-launch path is compiled too."""
    names = {(r["case"], r["name"]) for r in measured["rows"]}
    for case in ("paper", "ipg"):
        assert {(case, k) for k in ("_fwd_kernel", "_bwd_fused_kernel", "_bwd_delta_kernel", "_bwd_dq_kernel",
                                    "_bwd_kv_kernel")} <= names
    fused = [r for r in measured["rows"] if r["name"] == "_bwd_fused_kernel"]
    assert any(r["case"] == "paper" and r["facts"]["wgmma"] for r in fused)
    assert all(r["kwargs"]["ALIGNED"] for r in fused), "model-layout rows are 16-byte aligned"
    ipg = [r for r in measured["rows"] if r["case"] == "ipg" and r["name"] != "_bwd_delta_kernel"]
    assert all(r["kwargs"]["BANK_SHARED"] for r in ipg), "IPG launches must take the no-index bank path"


def test_launches_are_specialised_like_the_jit(measured):
    """Stride-1 arguments are constexprs and 16-divisible ones carry the alignment hint in the binary."""
    for r in measured["rows"]:
        assert r["specialised"], f"{r['case']} {r['label']}: no stride specialised to 1"
        assert r["hinted"], f"{r['case']} {r['label']}: no divisibility hints"


def test_gradient_atomics_are_relaxed_reductions(measured):
    """Relaxed fp32 atomics compile to REDG with no GPU-scope fence or L1 invalidate around them."""
    atomic = [r for r in measured["rows"] if r["ptx_atomics"]]
    assert any(r["name"] == "_bwd_fused_kernel" for r in atomic)
    for r in atomic:
        assert all(".relaxed." in a for a in r["ptx_atomics"]), (r["label"], r["ptx_atomics"])
        assert r["redg"] and not r["fences"], (r["case"], r["label"], r["fences"])


@measured_release
def test_docstring_table_is_the_measured_one(measured):
    """The table in the launcher module's docstring is regenerated from this test's output, not by hand."""
    from mip_dist.kernels import _triton_attention

    assert measured["table"] in _triton_attention.__doc__, \
        f"update the table in kernels/_triton_attention.py:\n{measured['table']}"


def test_one_loop_and_its_per_group_fallback_meet_the_targets():
    """Aligned rows launch one key loop (pipelined: cp.async); misaligned ones the per-group loops."""
    rows = compiled("""
        out = []
        for launch in _introspect.record_launches(mod, "paper", fused=False):
            if launch.name in ("_fwd_kernel", "_bwd_dq_kernel"):
                assert launch.kwargs["ONE_LOOP"]
                for one_loop in (True, False):
                    launch.kwargs["ONE_LOOP"] = one_loop
                    out.append(_introspect.binary_facts("paper", launch, _introspect.compile_launch(launch)))
        print(json.dumps(out))
    """)
    assert len(rows) == 4
    for r in rows:
        assert not r["problems"] and r["cp_async"], (r["label"], r["problems"])


@pytest.mark.parametrize("kernel, config, symptom", [
    ("_bwd_kv_kernel", (64, 64, 8, 2), "CTA/SM"),  # the former kv config: 159 registers x 8 warps
    ("_fwd_kernel", (128, 128, 4, 3), "spills"),  # an oversized forward tile
    ("_bwd_fused_kernel", (64, 64, 4, 2), "spills"),  # one-pass backward with 64-key blocks
])
def test_a_bad_config_fails_the_targets(kernel, config, symptom):
    """The check bites: a config that misses a target is reported with the reason."""
    name = {"_bwd_kv_kernel": "kv", "_fwd_kernel": "fwd", "_bwd_fused_kernel": "fused"}[kernel]
    found = compiled(f"""
        mod._CONFIGS[(True, False)] = {{**mod._CONFIGS[(True, False)], {name!r}: {config!r}}}
        launch = next(l for l in _introspect.record_launches(mod, "paper", fused={kernel != "_bwd_kv_kernel"})
                      if l.name == {kernel!r})
        print(json.dumps(_introspect.binary_facts("paper", launch, _introspect.compile_launch(launch))["problems"]))
    """)
    assert any(symptom in p for p in found), found


def test_other_dtypes_and_head_dims_compile():
    """Odd lengths (a 3-key sequence, 3 bank keys, no instance prompts) compile in every dtype/head dim,
    on both backward paths."""
    n = compiled("""
        count = 0
        for dtype, d in ((torch.float16, 128), (torch.float32, 32), (torch.bfloat16, 16)):
            case = dict(B=2, H=2, N=17, S=3, D=d, M=2, Pm=3, Pi=0, broadcast_q=False, indexed=True)
            for fused in (True, False):
                for launch in _introspect.record_launches(mod, case, dtype=dtype, fused=fused):
                    _introspect.compile_launch(launch)
                    count += 1
        print(count)
    """)
    assert n == 3 * (2 + 4)


def _candidate_facts(patch: str = "") -> list[dict]:
    """binary_facts of every autotune candidate at the paper and IPG shapes (after `patch`, code run first)."""
    return compiled(patch + """
        out = [_introspect.binary_facts(case, launch, _introspect.compile_launch(launch))
               for case in _introspect.CASES for launch in _introspect.candidate_launches(mod, case)]
        print(json.dumps(out))
    """)


@measured_release
def test_every_autotune_candidate_meets_the_sm90_targets():
    """Autotuning only ever picks among binaries with 0 spills, >= 2 CTAs/SM and wgmma where a block allows."""
    rows = _candidate_facts()
    bad = {(r["case"], r["label"], tuple(sorted(r["kwargs"].items()))): r["problems"] for r in rows if r["problems"]}
    assert not bad, bad
    per_kernel = {}
    for r in rows:
        per_kernel.setdefault((r["case"], r["name"]), []).append(r)
    for case in ("paper", "ipg"):  # the candidate lists are not empty: the check above covers real choices
        for name in ("_fwd_kernel", "_bwd_fused_kernel", "_bwd_dq_kernel"):
            assert len(per_kernel[(case, name)]) >= 2, (case, name)


def test_a_bad_autotune_candidate_is_caught():
    """The candidate check bites: a one-pass candidate of 128 queries x 8 warps gets 1 CTA/SM."""
    rows = _candidate_facts("""
        from mip_dist.kernels import _configs
        _configs._CANDIDATES[(True, False)]["fused"] += ((128, 32, 8, 2),)
    """)
    bad = [p for r in rows if r["case"] == "paper" and r["name"] == "_bwd_fused_kernel" for p in r["problems"]]
    assert any("CTA/SM" in p for p in bad), bad


def test_autotuning_is_off_in_deterministic_mode_and_off_the_gpu():
    """On a GPU (simulated: `_tune` as on CUDA) atomic-mode launches of fwd, one-pass and dq go through an
    autotuner over the shape's candidates; deterministic launches, and CPU tensors, take the fixed config."""
    got = compiled("""
        from mip_dist.kernels import _configs
        real_tune = mod._tune
        out = {"cpu": real_tune(torch.empty(1), False)}
        tuners = []
        def fake_autotuner(kernel, fn, candidates):
            tuners.append([kernel, list(candidates)])
            return _introspect._Recorder("tuned " + fn.name, fn.fn, fn.sink)
        _configs.autotuner = fake_autotuner
        mod._tune = lambda q, deterministic: not deterministic  # what a CUDA tensor gets
        for det in (False, True):
            for fused in (True, False):
                launches = _introspect.record_launches(mod, "paper", deterministic=det, fused=fused)
                out[f"{det} {fused}"] = [[l.name, {k: v for k, v in l.kwargs.items() if isinstance(v, int)}]
                                         for l in launches]
        out["tuners"] = tuners
        print(json.dumps(out))
    """)
    assert got["cpu"] is False
    fixed_keys = {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    tuned = {name for name, _ in got["False True"] + got["False False"] if name.startswith("tuned")}
    assert tuned == {"tuned _fwd_kernel", "tuned _bwd_fused_kernel", "tuned _bwd_dq_kernel"}
    for name, kwargs in got["False True"] + got["False False"]:  # the autotuner owns the tuned kwargs
        if name != "_bwd_delta_kernel":
            assert name.startswith("tuned") != (fixed_keys <= kwargs.keys()), (name, kwargs)
    for name, kwargs in got["True True"] + got["True False"]:
        assert not name.startswith("tuned"), name
        assert name == "_bwd_delta_kernel" or fixed_keys <= kwargs.keys(), (name, kwargs)
    for kernel, candidates in got["tuners"]:
        assert len(candidates) >= 2 and len({json.dumps(c, sort_keys=True) for c in candidates}) == len(candidates)
