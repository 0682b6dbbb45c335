"""launch/gpu_check.py on a CPU machine: it lists every planned check with its command and runs nothing; its
pure helpers (pytest counts, loss agreement, bench ratios, Markdown table) and its section runner (timeouts,
failures recorded while later sections still run, the report files) work on hand-made inputs."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "gpu_check.py"


def _load_script():
    """launch/gpu_check.py loaded by its path, as a module (launch/ is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("launch_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


gc = _load_script()

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def plan_output(tmp_path: Path, *extra: str) -> str:
    """Run the script as a user would; assert exit 0 and that it wrote nothing; return stdout."""
    out = tmp_path / "report" / "gpu_check.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *extra], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not out.parent.exists(), "a plan listing must not create the output folder"
    return r.stdout


def check_lines(stdout: str) -> dict[str, str]:
    """Plan check name -> its description line plus command line."""
    lines = stdout.splitlines()
    return {line.split(":")[0].strip(): line + "\n" + lines[i + 1]
            for i, line in enumerate(lines) if line.startswith("  ") and not line.startswith("      ")}


def assert_full_plan(stdout: str) -> None:
    """Every check the issue asks for appears once, with the command that performs it."""
    plan = check_lines(stdout)
    assert "env" in plan and "driver" in plan["env"]
    kernel = plan["kernel-tests"]
    assert "-m pytest" in kernel and "TRITON_INTERPRET" in kernel  # says it runs without the interpreter
    for f in gc.KERNEL_TESTS:
        assert f in kernel
    assert "bench_attention.py --out" in plan["bench-attention"]  # its cases: the paper block and IPG calls
    for impl in ("triton", "torch", "concat"):
        line = plan[f"model-{impl}"]
        assert f"--model-worker {impl}" in line and "--model-batch 64" in line and "bf16" in line
    for gpus in (1, 2):
        for stage in (0, 3):
            line = plan[f"deepspeed-{gpus}gpu-zero{stage}"]
            assert f"deepspeed --num_gpus {gpus}" in line and "launch/train.py --config configs/tiny.yaml" in line
            assert f"train.zero_stage={stage}" in line and "train.precision=bf16" in line
            assert "data.steps_per_epoch=25" in line and "train.epochs=2" in line  # 50 steps
        assert f"deepspeed-{gpus}gpu-zero3/metrics.jsonl" in plan[f"loss-agreement-{gpus}gpu"]
    assert "[needs 2 GPUs" in plan["deepspeed-2gpu-zero0"] and "[needs 2 GPUs" not in plan["deepspeed-1gpu-zero0"]
    assert all("timeout" in plan[n] for n in plan if not n.startswith("loss-agreement"))


@needs_cpu_only
def test_without_cuda_lists_the_plan_and_runs_nothing(tmp_path):
    out = plan_output(tmp_path)
    assert out.strip().endswith("no GPU: nothing run")
    assert_full_plan(out)


def test_dry_run_lists_the_same_plan(tmp_path):
    out = plan_output(tmp_path, "--dry-run")
    assert "nothing run" in out
    assert_full_plan(out)
    only = check_lines(plan_output(tmp_path, "--dry-run", "--only", "model", "kernel"))
    assert sorted(only) == ["kernel-tests", "model-concat", "model-torch", "model-triton"]


def test_parse_pytest_counts():
    text = "....F.s\nFAILED tests/x.py::t - boom\n2 failed, 40 passed, 1 skipped, 3 warnings in 12.34s\n"
    assert gc.parse_pytest_counts(text) == {"failed": 2, "passed": 40, "skipped": 1}
    assert gc.parse_pytest_counts("1 passed, 1 error in 0.5s") == {"passed": 1, "errors": 1}
    assert gc.parse_pytest_counts("ImportError: no module named x\n") == {}


def test_read_losses_keeps_train_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"kind": "train", "step": 1, "loss": 5.0}, {"kind": "eval", "step": 1, "all_single/mAP": 3.0},
            {"kind": "train", "step": 2, "loss": 4.5, "img_s": 100.0}]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert gc.read_losses(path) == {1: 5.0, 2: 4.5}


def test_compare_losses_tolerance_and_failures():
    ref = {1: 10.0, 2: 8.0, 3: 6.0}
    same = gc.compare_losses(ref, dict(ref), rtol=0.05, atol=0.02)
    assert same["ok"] and same["max_abs_diff"] == 0 and same["steps"] == 3
    # within atol + rtol*|ref| at every step: 10 -> 10.49 (tol 0.52), 6 -> 5.7 (tol 0.32)
    near = gc.compare_losses(ref, {1: 10.49, 2: 8.0, 3: 5.7}, rtol=0.05, atol=0.02)
    assert near["ok"] and near["max_abs_diff"] == pytest.approx(0.49) and near["worst_step"] == 3
    # step 3 off by 0.4 > 0.32: fails, naming the first bad step
    far = gc.compare_losses(ref, {1: 10.0, 2: 8.0, 3: 5.6}, rtol=0.05, atol=0.02)
    assert not far["ok"] and far["bad_steps"] == 1 and "first step 3" in far["reason"]
    assert gc.compare_losses(ref, dict(ref), rtol=0.0, atol=0.0)["ok"]  # exact equality passes at zero tolerance
    assert not gc.compare_losses(ref, {1: 10.0, 2: 8.0}, rtol=1.0, atol=1.0)["ok"]  # a step missing
    assert not gc.compare_losses({}, {}, rtol=1.0, atol=1.0)["ok"]  # nothing logged
    assert not gc.compare_losses(ref, {**ref, 2: float("nan")}, rtol=1.0, atol=1.0)["ok"]


def test_bench_ratios_from_bench_attention_rows():
    rows = [{"impl": "fused-triton", "case": "block", "B": 64, "N": 129, "L": 161, "mode": "fwd", "status": "ok",
             "ms": 0.5, "fused_speedup": 1.0},
            {"impl": "flex-attention", "case": "block", "B": 64, "N": 129, "L": 161, "mode": "fwd", "status": "ok",
             "ms": 1.0, "fused_speedup": 2.0},
            {"impl": "concat+sdpa-cudnn", "case": "block", "B": 64, "N": 129, "L": 161, "mode": "fwd",
             "status": "unavailable"},
            {"impl": "fused-triton", "case": "block", "B": 64, "N": 129, "L": 161, "mode": "bwd",
             "status": "unavailable"},
            {"impl": "fused-triton", "case": "ipg", "B": 64, "N": 129, "L": 161, "mode": "fwd", "status": "ok",
             "ms": 0.1, "fused_speedup": 1.0}]  # same B, N, mode as a block row: kept apart by case
    fwd, bwd, ipg = gc.bench_ratios(rows)
    assert fwd == {"case": "block", "B": 64, "N": 129, "L": 161, "mode": "fwd", "fused_ms": 0.5,
                   "ratios": {"flex-attention": 2.0}}
    assert ipg["case"] == "ipg" and ipg["fused_ms"] == 0.1
    assert bwd["mode"] == "bwd" and bwd["fused_ms"] is None and bwd["ratios"] == {}


def hand_made_report() -> dict:
    """A report as run_all writes it: 1 GPU, one failed and one skipped check."""
    losses = {s: 5.0 - 0.01 * s for s in range(1, 51)}
    return {
        "date": "2026-12-01T10:11:12", "seconds": 301.0,
        "env": {"gpus": ["NVIDIA H200"], "driver": "570.86", "cuda": "13.0", "torch": "2.14", "triton": "3.8",
                "deepspeed": "0.19"},
        "checks": [
            {"name": "kernel-tests", "kind": "pytest", "status": "fail", "seconds": 61.2,
             "summary": "1 failed, 22 passed"},
            {"name": "bench-attention", "kind": "bench", "status": "pass", "seconds": 30.0, "summary": "ok",
             "note": "closest shape", "ratios": [{"case": "ipg", "B": 64, "N": 210, "L": 226, "mode": "fwd+bwd",
                                                  "fused_ms": 1.234,
                                                  "ratios": {"flex-attention": 1.5, "torch-path": 3.25}}]},
            {"name": "model-triton", "kind": "model", "impl": "triton", "status": "pass", "seconds": 20.0,
             "batch": 64, "img_s": 812.4, "step_ms": 78.8, "peak_alloc_gib": 21.5, "peak_reserved_gib": 24.0},
            {"name": "deepspeed-1gpu-zero0", "kind": "train", "status": "pass", "seconds": 40.0, "losses": losses,
             "first_loss": 4.99, "last_loss": 4.5, "img_s": 900.0},
            {"name": "deepspeed-1gpu-zero3", "kind": "train", "status": "pass", "seconds": 41.0, "losses": losses,
             "first_loss": 4.99, "last_loss": 4.5, "img_s": 700.0},
            {"name": "loss-agreement-1gpu", "kind": "compare", "status": "pass", "other": "deepspeed-1gpu-zero3",
             "ref": "deepspeed-1gpu-zero0", "max_abs_diff": 0.0012},
            {"name": "deepspeed-2gpu-zero0", "kind": "train", "status": "skipped", "seconds": 0.0,
             "summary": "needs 2 GPUs, 1 here"},
        ]}


def test_render_markdown_table():
    md = gc.render_markdown(hand_made_report())
    lines = md.splitlines()
    assert lines[0] == "### GPU check: 1 x NVIDIA H200 (2026-12-01)"
    assert "driver 570.86" in md and "CUDA 13.0" in md and "Triton 3.8" in md
    assert "| kernel-tests | fail | 61 s | 1 failed, 22 passed |" in lines
    assert "| deepspeed-2gpu-zero0 | skipped | 0 s | needs 2 GPUs, 1 here |" in lines
    assert "| shape | mode | fused-triton ms | flex-attention | torch-path |" in lines
    assert "| ipg B64 N210 L226 | fwd+bwd | 1.234 | 1.50 | 3.25 |" in lines
    assert "bench-attention: closest shape." in lines
    assert "| triton | 812 | 78.8 | 21.50 | 24.00 |" in lines
    assert "| deepspeed-1gpu-zero3 | pass | 4.9900 | 4.5000 | 700 | 1.20e-03 | yes |" in lines
    assert "| deepspeed-1gpu-zero0 | pass | 4.9900 | 4.5000 | 900 | – | – |" in lines
    assert md.count("deepspeed-2gpu-zero0") == 1  # a skipped run is not in the DeepSpeed table
    for line in lines:  # every table row has as many cells as its header
        if line.startswith("|"):
            assert line.count("|") >= 5, line


def test_exit_code_and_child_env(monkeypatch):
    assert gc.exit_code([{"status": "pass"}, {"status": "skipped"}]) == 0
    for bad in ("fail", "timeout", "not run"):
        assert gc.exit_code([{"status": "pass"}, {"status": bad}]) == 1
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" not in gc.child_env()


def args_for(tmp_path: Path, *extra: str):
    return gc.parse_args(["--out", str(tmp_path / "r" / "gpu_check.json"), *extra])


def test_run_command_kills_a_section_at_its_timeout(tmp_path):
    t0 = time.monotonic()
    rc, seconds = gc.run_command([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                                 1.0, tmp_path / "slow.log")
    assert rc is None and seconds < 10 and time.monotonic() - t0 < 10
    assert "started" in (tmp_path / "slow.log").read_text()


def test_run_all_records_failures_and_keeps_going(tmp_path, capsys):
    """A failing section, a passing one after it, a timed-out one and a 2-GPU one on a 1-GPU machine."""
    py = sys.executable
    plan = [gc.Check("kernel-tests", "fails", "pytest", [py, "-c", "print('1 failed, 3 passed in 0.1s'); exit(1)"], 30),
            gc.Check("kernel-tests-again", "passes", "pytest", [py, "-c", "print('4 passed in 0.1s')"], 30),
            gc.Check("slow", "times out", "pytest", [py, "-c", "import time; time.sleep(60)"], 1),
            gc.Check("deepspeed-2gpu-zero0", "needs 2", "train", [py, "-c", "exit(1)"], 30, gpus=2)]
    args = args_for(tmp_path)
    assert gc.run_all(plan, args, n_gpus=1) == 1
    report = json.loads(args.out.read_text())
    status = {r["name"]: r["status"] for r in report["checks"]}
    assert status == {"kernel-tests": "fail", "kernel-tests-again": "pass", "slow": "timeout",
                      "deepspeed-2gpu-zero0": "skipped"}
    assert report["failed"] == ["kernel-tests", "slow"] and report["ok"] is False
    assert report["checks"][1]["counts"] == {"passed": 4}
    assert "1 failed, 3 passed" in report["checks"][0]["output_tail"]
    md = (args.out.parent / "gpu_check.md").read_text()
    assert "| kernel-tests-again | pass |" in md and "| slow | timeout |" in md
    assert (args.out.parent / "logs" / "kernel-tests.log").is_file()
    assert "FAILED: kernel-tests, slow" in capsys.readouterr().out


def test_run_all_passes_and_budget_limits(tmp_path):
    py = sys.executable
    ok = gc.Check("kernel-tests", "passes", "pytest", [py, "-c", "print('2 passed in 0.1s')"], 30)
    assert gc.run_all([ok], args_for(tmp_path / "a"), n_gpus=1) == 0
    # no budget left: the section is not started and counts as a failure
    late = gc.run_check(ok, tmp_path, 1, time.monotonic() + 1, {}, args_for(tmp_path))
    assert late["status"] == "not run"


def test_loss_agreement_check_uses_both_runs(tmp_path):
    args = args_for(tmp_path)
    cmp = gc.Check("loss-agreement-1gpu", "compare", "compare", [], 0,
                   extra={"ref": "deepspeed-1gpu-zero0", "other": "deepspeed-1gpu-zero3"})
    ref = {"status": "pass", "losses": {1: 5.0, 2: 4.0}}
    good = gc.run_check(cmp, tmp_path, 1, time.monotonic() + 60,
                        {"deepspeed-1gpu-zero0": ref, "deepspeed-1gpu-zero3": {"status": "pass",
                                                                              "losses": {1: 5.01, 2: 4.02}}}, args)
    assert good["status"] == "pass" and good["max_abs_diff"] == pytest.approx(0.02)
    bad = gc.run_check(cmp, tmp_path, 1, time.monotonic() + 60,
                       {"deepspeed-1gpu-zero0": ref, "deepspeed-1gpu-zero3": {"status": "pass",
                                                                             "losses": {1: 5.0, 2: 5.0}}}, args)
    assert bad["status"] == "fail" and "first step 2" in bad["summary"]
    missing = gc.run_check(cmp, tmp_path, 1, time.monotonic() + 60, {"deepspeed-1gpu-zero0": ref}, args)
    assert missing["status"] == "fail"


def test_model_worker_finds_bench_model_beside_it_without_sys_path():
    from mip_dist.config import load_config

    assert str(REPO / "launch") not in sys.path
    model = load_config(REPO / "configs" / "mip_vitb16_sysu.yaml", ["model.pretrained="]).model
    flops = gc._bench_model().analytic_gflops
    assert flops(model, "concat", 8) > flops(model, "triton", 8) > 0  # concat attends over the prompts per row
