"""launch/bench_attention.py: the CPU interpreter smoke, the analytic HBM byte counts, peak bandwidth, host overhead."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "launch" / "bench_attention.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the full GPU benchmark")
def test_cpu_smoke_writes_errors_and_says_timings_need_a_gpu(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the script switches the interpreter on itself
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    written = []  # (cases in the file, partial?) each time the file is rewritten
    write = bench.write_result
    monkeypatch.setattr(bench, "write_result", lambda path, result: (
        written.append((len(result["smoke"]), result["partial"])), write(path, result)))
    assert bench.main(["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Timings need a GPU" in printed
    n = len(bench.SMOKE)
    assert written == [(i, True) for i in range(1, n + 1)] + [(n, False)]  # after every case, then the final
    result = json.loads(out.read_text())
    assert len(result["smoke"]) == len(bench.SMOKE)
    for case in result["smoke"]:
        errs = case["max_abs_err"]
        assert {"o", "q", "k", "v", "bank_k", "bank_v"} <= errs.keys()
        limit = 5e-3 if "float16" in case["case"] else 1e-5
        assert max(errs.values()) < limit, case


def _bench_module():
    """launch/bench_attention.py loaded as a module."""
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_analytic_counts_forward_plus_backward_and_the_paper_traffic(capsys):
    """fwd+bwd bytes are the sum of both passes; the 3-launch paper backward moves ~283 MB vs ~173 MB ideal,
    the one-pass backward (the default for N <= 256) is within 1.15x of the ideal fwd+bwd bytes."""
    bench = _bench_module()
    result = bench.analytic(bench.parse_args(["--analytic", "--batch", "64", "--tokens", "211"]))
    rows = {(r["case"].split()[0], r["design"].split(":")[0], r["mode"]): r for r in result["analytic"]}
    for case in ("block", "ipg"):
        for design in ("3-launch", "one-pass"):
            got = [rows[(case, design, m)] for m in bench.MODES]
            assert got[2]["bytes"] == pytest.approx(got[0]["bytes"] + got[1]["bytes"])
            assert got[2]["ideal_bytes"] == pytest.approx(got[0]["ideal_bytes"] + got[1]["ideal_bytes"])
    today = rows[("block", "3-launch", "bwd")]
    assert today["bytes"] / 1e6 == pytest.approx(283, abs=2)
    assert today["ideal_bytes"] / 1e6 == pytest.approx(173, abs=1)
    for case in ("block", "ipg"):
        assert rows[(case, "one-pass", "fwd+bwd")]["x_ideal"] <= 1.15
    assert "x ideal" in capsys.readouterr().out


def test_peak_bandwidth_comes_from_the_gpu_name():
    bench = _bench_module()
    assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert bench.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert bench.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert bench.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert bench.peak_bandwidth("Some Future GPU") is None


def test_host_overhead_runs_with_stubbed_kernels_and_restores_them():
    """The measurement itself (numbers are reported, not asserted: no timed assertions in tests)."""
    pytest.importorskip("triton")
    from mip_dist.kernels import _backend

    bench = _bench_module()
    mod = _backend.kernel_module()
    kernels = {name: getattr(mod, name) for name in ("_fwd_kernel", "_bwd_fused_kernel", "_bwd_kv_kernel")}
    result = bench.host_overhead(bench.parse_args(["--host-overhead", "--host-iters", "3"]))
    paths = {(r["case"], r["path"]) for r in result["host_overhead"]}
    assert ("paper", "launcher fwd") in paths and ("ipg", "entry bwd (autograd.grad)") in paths
    assert all(r["us"] > 0 for r in result["host_overhead"])
    assert all(getattr(mod, name) is fn for name, fn in kernels.items())


def test_every_gradient_is_checked_before_timing_at_block_and_ipg_shapes():
    """The pre-timing check covers o and all 7 gradients (5 at the IPG call), and catches a wrong impl."""
    from torch.nn.attention import SDPBackend

    bench = _bench_module()
    args = bench.parse_args(["--batch", "2", "--heads", "2", "--head-dim", "16", "--tokens", "9",
                             "--ipg-queries", "4", "--ipg-keys", "7"])
    block, ipg = bench.cases(args)
    assert ipg["broadcast_q"] and not ipg["indexed"] and ipg["Pi"] == 0
    for c, n_grads in ((block, 7), (ipg, 5)):
        x = bench.make_inputs(c, torch.float32, "cpu")
        for fn in (bench.concat_sdpa(SDPBackend.MATH), lambda **kw: bench.prompt_attention(**kw, impl="torch")):
            errs = bench.check_against_reference(fn, x)
            assert len(errs) == 1 + n_grads and max(errs.values()) < 1e-5, errs
        wrong = bench.check_against_reference(lambda **kw: 1.01 * bench.prompt_attention(**kw, impl="torch"), x)
        assert wrong["o"] > bench.GRAD_TOL[torch.float32]


def test_flex_attention_is_compiled_per_shape_within_dynamos_recompile_limit():
    """The limit covers every shape of the sweep (grad and no-grad forward each), and hitting it raises
    instead of timing an uncompiled FlexAttention."""
    import torch._dynamo

    bench = _bench_module()
    with torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=False):
        bench.flex_concat(len(bench.cases(bench.parse_args([]))) * 5)
        assert torch._dynamo.config.recompile_limit >= 2 * 6 * 5
        assert torch._dynamo.config.fail_on_recompile_limit_hit


def test_speedups_and_table_cover_do_bench_and_cuda_graph_times(capsys):
    """Each timer gets its own ratio to fused-triton; a row without a graph time (not capturable) still prints."""
    bench = _bench_module()
    base = dict(case="block", B=64, N=211, mode="fwd+bwd", status="ok", tflops=1.0, gbps=1.0, hbm_bound_ms=0.1,
                x_hbm_bound=2.0)
    rows = [dict(base, impl="fused-triton", ms=0.2, ms_graph=0.15, x_hbm_bound_graph=1.5),
            dict(base, impl="concat+sdpa-flash", ms=0.5, ms_graph=0.3, x_hbm_bound_graph=3.0),
            dict(base, impl="flex-attention", ms=0.4, graph_reason="RuntimeError: not capturable")]
    bench.add_speedups(rows)
    assert rows[1]["fused_speedup"] == pytest.approx(2.5) and rows[1]["fused_speedup_graph"] == pytest.approx(2.0)
    assert "fused_speedup_graph" not in rows[2] and rows[2]["fused_speedup"] == pytest.approx(2.0)
    bench.print_table(rows)
    assert "graph ms" in capsys.readouterr().out


def test_host_overhead_times_a_baseline_copy_of_the_kernels_side_by_side(tmp_path):
    """--baseline-kernels runs another copy of kernels/ in a child process: rows for both, and a broken copy
    fails naming the folder (so the child really imports the copy, not this checkout's kernels)."""
    import shutil

    pytest.importorskip("triton")
    bench = _bench_module()
    copy = tmp_path / "kernels"
    shutil.copytree(BENCH.parent.parent / "kernels", copy, ignore=shutil.ignore_patterns("__pycache__"))
    args = ["--host-overhead", "--host-iters", "2", "--host-rounds", "1", "--baseline-kernels", str(copy)]
    rows = bench.host_overhead(bench.parse_args(args))["host_overhead"]
    for label in ("baseline", "current"):
        assert {("paper", "entry bwd (autograd.grad)"), ("ipg", "launcher fwd")} <= \
            {(r["case"], r["path"]) for r in rows if r["kernels"] == label}
    (copy / "_op.py").write_text("raise ImportError('the baseline copy was imported')\n")
    with pytest.raises(RuntimeError, match="the baseline copy was imported"):
        bench.host_overhead(bench.parse_args(args))


def test_gpu_rows_are_written_as_each_implementation_finishes(monkeypatch):
    """bench_gpu hands its rows to `save` after every implementation at every shape (only the modes asked
    for), with the ratios to the fused kernel so far; run here on the CPU with stand-in timings."""
    bench = _bench_module()
    torch_path = lambda **x: bench.prompt_attention(**x, impl="torch")  # noqa: E731
    fused = lambda **x: bench.prompt_attention(**x, impl="torch")  # noqa: E731 - stands in for the kernel
    monkeypatch.setattr(bench, "implementations", lambda shapes=1: {
        "fused-triton": fused, "torch-path": torch_path, "flex-attention": torch_path})
    monkeypatch.setattr(bench, "time_modes", lambda fn, x, warmup, rep, timer="do_bench", modes=bench.MODES: {
        m: (0.5 if fn is fused else 1.5) for m in modes})
    args = bench.parse_args(["--batch", "2", "--heads", "2", "--head-dim", "16", "--tokens", "9", "--ipg-queries", "4",
                             "--ipg-keys", "7", "--dtype", "fp32", "--peak-bw", "1e12", "--modes", "fwd", "fwd+bwd",
                             "--impls", "fused-triton", "torch-path"])
    saved = []
    result = bench.bench_gpu(args, lambda partial: saved.append(json.loads(json.dumps(partial))), device="cpu")
    assert [len(s["rows"]) for s in saved] == [2, 4, 6, 8]  # 2 modes x (2 impls) x (block, ipg)
    assert saved[-1]["rows"] == json.loads(json.dumps(result["rows"]))
    rows = result["rows"]
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"} and {r["impl"] for r in rows} == {"fused-triton",
                                                                                              "torch-path"}
    assert all(r["status"] == "ok" for r in rows)
    assert [r["fused_speedup"] for r in rows if r["impl"] == "torch-path"] == [pytest.approx(3.0)] * 4
