"""launch/gpu_check.py without a GPU: its plan (order, budgets within 420 s, commands), its offline install (pip
with --no-index --no-deps before anything imports the project), its section runner (report rewritten after each
section, failures and time-outs recorded while later sections still run) and its judges on hand-made runs."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "launch" / "gpu_check.py"
ORDER = ["preflight", "deepspeed", "paper-model", "kernel-tests", "bench-attention", "bench-data"]


def _load_script():
    """launch/gpu_check.py loaded by its path, as a module (launch/ is not on sys.path)."""
    spec = importlib.util.spec_from_file_location("launch_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


gc = _load_script()

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def context(tmp_path: Path):
    return gc.Context(workdir=tmp_path / "work", report=tmp_path / "report")


def by_name(plan) -> dict:
    return {s.name: s for s in plan}


# ----------------------------------------------------------------------------------------------- the plan
def test_plan_order_and_budgets_fit_the_limit(tmp_path):
    plan = gc.build_plan(context(tmp_path))
    assert [s.name for s in plan] == ORDER
    assert gc.plan_total(plan) + gc.INSTALL_BUDGET_S <= gc.TOTAL_BUDGET_S == 420
    assert all(step.budget_s > 0 for s in plan for step in s.steps)
    assert gc.plan_total(plan) == sum(step.budget_s for s in plan for step in s.steps)


def test_deepspeed_runs_are_one_rank_bf16_with_checkpoint_resume_and_export(tmp_path):
    section = by_name(gc.build_plan(context(tmp_path)))["deepspeed"]
    steps = {s.name: s for s in section.steps}
    assert list(steps) == ["zero0", "zero0-resume", "zero3", "zero3-resume"]
    for stage in (0, 3):
        first, again = (" ".join(steps[n].cmd) for n in (f"zero{stage}", f"zero{stage}-resume"))
        for cmd in (first, again):
            assert "--train-worker" in cmd and "--config configs/tiny.yaml" in cmd
            assert f"train.zero_stage={stage}" in cmd and "train.precision=bf16" in cmd and "train.device=cuda" in cmd
            assert f"train.run_name=tiny-zero{stage}" in cmd
        assert "train.epochs=1" in first and "--resume" not in first
        assert "train.epochs=2" in again and again.endswith("--resume auto --allow-config-change train.epochs")
        assert steps[f"zero{stage}-resume"].needs == f"zero{stage}"
    assert not any("deepspeed --num_gpus" in " ".join(s.cmd) for s in section.steps)
    assert "nccl" not in section.what.lower() and "no collective between ranks" in section.what


def test_paper_model_kernel_tests_and_benchmarks_commands(tmp_path):
    ctx = context(tmp_path)
    plan = by_name(gc.build_plan(ctx))
    for step, stage in zip(plan["paper-model"].steps, (0, 1)):
        cmd = step.cmd
        assert cmd[cmd.index("--config") + 1] == "configs/mip_vitb16_sysu.yaml"
        assert "model.pretrained=" in cmd and "data.dataset=synthetic" in cmd and f"train.zero_stage={stage}" in cmd
        assert "data.steps_per_epoch=30" in cmd and "train.precision=bf16" in cmd
    pytest_cmd = plan["kernel-tests"].steps[0].cmd
    assert pytest_cmd[1:3] == ["-m", "pytest"] and "-v" in pytest_cmd and "--timeout" in pytest_cmd
    assert pytest_cmd[pytest_cmd.index("--junitxml") + 1] == str(ctx.report / "kernel_tests.xml")
    assert "cuda" in pytest_cmd[pytest_cmd.index("-k") + 1]
    bench = " ".join(plan["bench-attention"].steps[0].cmd)
    assert "--impls fused-triton concat+sdpa-flash torch-path --modes fwd fwd+bwd" in bench
    assert f"--out {ctx.report / 'bench_attention.json'}" in bench and "--batch 64 --tokens 211" in bench
    data = " ".join(plan["bench-data"].steps[0].cmd)
    assert data.endswith(f"bench_data.py --workers 8 14 --seconds 30 --json {ctx.report / 'bench_data.json'}")


def run_script(*args: str, python: tuple = (sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run([*python, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@needs_cpu_only
def test_without_cuda_it_prints_each_budget_and_the_total_and_writes_nothing(tmp_path):
    r = run_script("--report", str(tmp_path / "report"), "--workdir", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.strip().endswith("no GPU: nothing run")
    for i, section in enumerate(gc.build_plan(context(tmp_path)), 1):
        assert f"  {i}. {section.name} ({section.budget_s} s): " in out
    assert "= 420 s (limit 420 s)" in out
    assert not (tmp_path / "report").exists() and not (tmp_path / "work").exists()


def test_a_bare_interpreter_can_print_the_plan(tmp_path):
    """-S -I: no site-packages (no torch, no mip_dist), as on a machine before --install."""
    r = run_script("--dry-run", "--workdir", str(tmp_path / "w"), "--only", "kernel-tests", "bench-data",
                   python=(sys.executable, "-S", "-I"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1. kernel-tests" in r.stdout and "2. bench-data" in r.stdout and "dry run: nothing run" in r.stdout
    assert run_script("--dry-run", "--only", "nope").returncode == 2


def test_train_worker_arguments_after_the_double_dash_go_to_train_py():
    args = gc.parse_args(["--train-worker", "r.json", "--", "--config", "configs/tiny.yaml", "a.b=1", "--resume",
                          "auto"])
    assert args.train_worker == Path("r.json")
    assert args.train_args == ["--config", "configs/tiny.yaml", "a.b=1", "--resume", "auto"]


INSTALL_DRIVER = r"""
import json, os, runpy, subprocess, sys
calls = []
def fake_run(cmd, *a, **k):
    calls.append({"cmd": list(cmd), "loaded": sorted(m for m in sys.modules
                                                     if m.split(".")[0] in ("torch", "mip_dist", "deepspeed"))})
    return subprocess.CompletedProcess(cmd, 0, "", "")
subprocess.run = fake_run
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
try:
    runpy.run_path(script, run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code
print("DRIVER " + json.dumps({"code": code, "calls": calls, "pythonpath": os.environ.get("PYTHONPATH"),
                              "safe": os.environ.get("PYTHONSAFEPATH")}))
"""


def test_install_runs_pip_offline_before_anything_imports_the_project(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name in ("deepspeed-0.19.8-py3-none-any.whl", "hjson-3.1.0-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    site = tmp_path / "site"
    relative = os.path.relpath(wheels, REPO)  # as typed on the machine (.whl): pip gets absolute paths
    r = subprocess.run([sys.executable, "-S", "-c", INSTALL_DRIVER, str(SCRIPT), "--install", relative, "--site",
                        str(site), "--workdir", str(tmp_path / "w"), "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.split("DRIVER ", 1)[1])
    assert result["code"] == 0 and len(result["calls"]) == 2
    for call in result["calls"]:
        cmd = call["cmd"]
        assert cmd[1:4] == ["-m", "pip", "install"]
        assert {"--no-index", "--no-deps", "--no-build-isolation"} <= set(cmd)
        assert cmd[cmd.index("--target") + 1] == str(site)
        assert call["loaded"] == []  # nothing of torch, mip_dist or deepspeed imported yet
    assert result["calls"][0]["cmd"][-2:] == [str(wheels / "deepspeed-0.19.8-py3-none-any.whl"),
                                              str(wheels / "hjson-3.1.0-py3-none-any.whl")]
    source = Path(result["calls"][1]["cmd"][-1])  # a fresh copy of the checkout: mip_dist.kernels from kernels/
    assert source != REPO and (source / "setup.py").is_file() and (source / "kernels" / "__init__.py").is_file()
    assert not (source / "build").exists()
    assert result["pythonpath"].split(":")[0] == str(site) and result["safe"] == "1"
    assert "install: 2 wheels" in r.stdout and "0. install (25 s)" in r.stdout


# ----------------------------------------------------------------------------------------------- the runner
def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def read_report(folder: Path) -> str:
    """Python that loads the report on disk: r (JSON), md (Markdown), s (section name -> status)."""
    return (f"import json; r = json.load(open({str(folder / 'gpu_check.json')!r})); "
            f"md = open({str(folder / 'gpu_check.md')!r}).read(); "
            "s = {x['name']: x['status'] for x in r['sections']}; ")


def crash(section, steps, ctx):
    raise RuntimeError("judge broke")


def test_runner_rewrites_the_report_after_each_section_and_keeps_going(tmp_path, capsys):
    """A section timing out, one checking the report the first left, one failing, one whose judge crashes and
    whose second step needs a failed first: each recorded, the report on disk after every section."""
    ctx = context(tmp_path)
    rd = read_report(ctx.report)
    stale = tmp_path / "stale.json"  # a result left by an earlier run: removed before the step that writes it
    stale.write_text("{}")
    plan = [
        gc.Section("slow", "times out", [gc.Step("sleep", py("import time; print('started', flush=True); "
                                                             "time.sleep(60)"), 2)]),
        gc.Section("reader", "sees the first section in the report", [gc.Step("check", py(
            rd + "assert s == {'slow': 'timeout'}, s; assert '| slow | timeout |' in md; "
            f"import os; assert not os.path.exists({str(stale)!r}); print('checked')"), 30, clear=(stale,))]),
        gc.Section("broken", "fails", [gc.Step("exit", py(rd + "assert s['reader'] == 'pass', s; exit(3)"), 30)]),
        gc.Section("judged", "a crashing judge", [gc.Step("first", py("exit(1)"), 30),
                                                  gc.Step("second", py("print('never')"), 30, needs="first")], crash),
    ]
    t0 = time.monotonic()
    report = gc.run_plan(plan, ctx, "test")
    assert time.monotonic() - t0 < 30  # the time-out came at 2 s
    status = {s["name"]: s["status"] for s in report["sections"]}
    assert status == {"slow": "timeout", "reader": "pass", "broken": "fail", "judged": "fail"}
    on_disk = json.loads((ctx.report / "gpu_check.json").read_text())
    assert {s["name"]: s["status"] for s in on_disk["sections"]} == status
    assert on_disk["failed"] == ["slow", "broken", "judged"] and on_disk["ok"] is False
    judged = on_disk["sections"][3]
    assert "judging failed: RuntimeError: judge broke" in judged["summary"]
    assert [s["status"] for s in judged["steps"]] == ["fail", "not run"]
    tails = (ctx.report / "tails.log").read_text()
    assert "started" in tails and "checked" in tails and "never" not in tails
    assert "| broken | fail |" in (ctx.report / "gpu_check.md").read_text()
    assert gc.exit_code(report["sections"]) == 1
    assert "slow/sleep: timeout" in capsys.readouterr().out


def test_unused_time_passes_to_later_steps_but_never_past_the_section_end(tmp_path):
    ctx = context(tmp_path)
    fast = gc.Section("s", "two steps", [gc.Step("a", py("pass"), 20), gc.Step("b", py("pass"), 5)])
    res = gc.run_section(fast, time.monotonic() + fast.budget_s, ctx, lambda steps: None)
    a, b = res["steps"]
    assert a["limit_s"] <= 20.1 and b["limit_s"] > 5.5  # b may use what a left
    late = gc.run_section(fast, time.monotonic() + 0.5, ctx, lambda steps: None)
    assert [s["status"] for s in late["steps"]] == ["not run", "not run"] and late["status"] == "not run"


def test_run_command_kills_a_step_at_its_timeout(tmp_path):
    t0 = time.monotonic()
    rc, seconds = gc.run_command(py("import time; print('started', flush=True); time.sleep(60)"), 1.0,
                                 tmp_path / "slow.log")
    assert rc is None and seconds < 10 and time.monotonic() - t0 < 10
    assert "started" in (tmp_path / "slow.log").read_text()


def test_child_env_runs_compiled_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET" not in gc.child_env()


# ----------------------------------------------------------------------------------------------- judges
def write_metrics(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"kind": "train", **r}) + "\n" for r in records))


def tiny_runs(ctx, tmp_path: Path, losses3=None, resumed_at=25) -> list[dict]:
    """Both tiny stages as the trainer leaves them after 25 steps + a resume to 50; logs without 'nccl'."""
    steps = []
    for stage in (0, 3):
        run_dir = gc.tiny_run_dir(ctx, stage)
        losses = {s: 5.0 - 0.01 * s for s in range(1, 51)} if stage == 0 or losses3 is None else losses3
        write_metrics(run_dir / "metrics.jsonl", [{"step": s, "loss": v, "img_s": 900.0} for s, v in losses.items()])
        (run_dir / "FINISHED").write_text(json.dumps({"status": "finished", "step": 50}))
        (run_dir / "model_final.pt").write_bytes(b"x")
        first, again = tmp_path / f"z{stage}.log", tmp_path / f"z{stage}r.log"
        first.write_text(f"rank 0/1 (local 0) on cuda:0\nfinished: step 25, run directory {run_dir}\n")
        again.write_text(f"resumed from {run_dir}/checkpoints/step{resumed_at:08d}: step {resumed_at}, epoch 1\n"
                         f"finished: step 50, run directory {run_dir}\n")
        steps += [{"name": f"zero{stage}", "status": "pass", "log": str(first)},
                  {"name": f"zero{stage}-resume", "status": "pass", "log": str(again)}]
    return steps


def test_deepspeed_judge_passes_one_rank_without_nccl_and_checks_resume_and_losses(tmp_path):
    ctx = context(tmp_path)
    section = by_name(gc.build_plan(ctx))["deepspeed"]
    good = gc.judge_deepspeed(section, tiny_runs(ctx, tmp_path), ctx)
    assert good["ok"], good["summary"]
    assert [r["resumed_at"] for r in good["runs"]] == [25, 25] and all(r["exported"] for r in good["runs"])
    assert good["agreement"]["max_abs_diff"] == 0
    far = {s: 5.0 - 0.01 * s + (0.5 if s == 40 else 0.0) for s in range(1, 51)}
    bad = gc.judge_deepspeed(section, tiny_runs(ctx, tmp_path, losses3=far), ctx)
    assert not bad["ok"] and "first step 40" in bad["summary"]
    fresh = gc.judge_deepspeed(section, tiny_runs(ctx, tmp_path, resumed_at=0), ctx)  # started over, no resume
    assert not fresh["ok"]


def test_paper_judge_reports_steady_img_s_data_wait_and_peak_memory(tmp_path):
    ctx = context(tmp_path)
    for stage in (0, 1):
        write_metrics(gc.paper_run_dir(ctx, stage) / "metrics.jsonl",
                      [{"step": s, "loss": 7.0, "img_s": 10.0 if s == 5 else 600.0 + stage,
                        "data_wait": 0.5 if s == 5 else 0.02, "step_time": 0.1} for s in range(5, 31, 5)])
        gc.worker_result(ctx, f"paper-zero{stage}").write_text(json.dumps({"peak_alloc_gib": 20.0 + stage,
                                                                           "peak_reserved_gib": 24.0}))
    steps = [{"name": "zero0", "status": "pass"}, {"name": "zero1", "status": "pass"}]
    res = gc.judge_paper(None, steps, ctx)
    assert res["ok"]
    zero0, zero1 = res["runs"]
    assert zero0["img_s"] == pytest.approx(600.0) and zero1["img_s"] == pytest.approx(601.0)  # first window left out
    assert zero0["data_wait"] == pytest.approx(0.02) and zero1["peak_alloc_gib"] == 21.0
    assert "ZeRO-1: 601 img/s, data wait 2%, peak 21.0 GiB" in res["summary"]
    assert not gc.judge_paper(None, [steps[0], {"name": "zero1", "status": "timeout"}], ctx)["ok"]


def test_pytest_counts_from_junit_or_from_the_verbose_lines_of_a_killed_run(tmp_path):
    junit = tmp_path / "k.xml"
    junit.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="10" failures="1" errors="0" '
                     'skipped="2"></testsuite></testsuites>')
    assert gc.pytest_counts("", junit) == {"passed": 7, "failed": 1, "errors": 0, "skipped": 2}
    log = ("[gw0] [ 10%] PASSED tests/test_kernel_attention.py::test_bfloat16[cuda]\n"
           "[gw1] [ 20%] FAILED tests/test_kernel_model.py::test_tiny_model_triton_matches_concat[cuda-x]\n"
           "tests/test_kernel_attention.py::test_gpu_grid_bf16_and_larger PASSED [ 30%]\n"
           "PASSED is not a test line\n")
    assert gc.pytest_counts(log, None) == {"passed": 2, "failed": 1, "errors": 0, "skipped": 0}


def test_bench_judges_read_the_rows_written_so_far(tmp_path):
    ctx = context(tmp_path)
    ctx.report.mkdir(parents=True)
    row = dict(case="block", B=64, N=211, L=243, mode="fwd+bwd", status="ok")
    (ctx.report / "bench_attention.json").write_text(json.dumps({"partial": True, "rows": [
        {**row, "impl": "fused-triton", "ms": 0.5, "fused_speedup": 1.0},
        {**row, "impl": "concat+sdpa-flash", "ms": 1.0, "fused_speedup": 2.0}]}))
    res = gc.judge_bench_attention(None, [{"status": "timeout"}], ctx)
    assert not res["ok"] and res["ratios"][0]["ratios"] == {"concat+sdpa-flash": 2.0}
    assert "fwd+bwd 0.500 ms (concat+sdpa-flash x2.00)" in res["summary"]
    (ctx.report / "bench_data.json").write_text(json.dumps({"rows": [
        {"workers": 8, "img_s": 1600.0, "img_s_per_worker": 200.0, "batches": 750, "seconds": 30.0}]}))
    half = gc.judge_bench_data(None, [{"status": "timeout"}], ctx)
    assert not half["ok"] and half["summary"] == "8 workers 1600 img/s (200/worker)"
    assert gc.judge_bench_data(None, [{"status": "pass"}], ctx)["ok"] is False  # 14 workers missing


def test_compare_losses_tolerance_and_failures():
    ref = {1: 10.0, 2: 8.0, 3: 6.0}
    same = gc.compare_losses(ref, dict(ref), rtol=0.05, atol=0.02)
    assert same["ok"] and same["max_abs_diff"] == 0 and same["steps"] == 3
    near = gc.compare_losses(ref, {1: 10.49, 2: 8.0, 3: 5.7}, rtol=0.05, atol=0.02)  # tol 0.52 and 0.32
    assert near["ok"] and near["max_abs_diff"] == pytest.approx(0.49) and near["worst_step"] == 3
    far = gc.compare_losses(ref, {1: 10.0, 2: 8.0, 3: 5.6}, rtol=0.05, atol=0.02)
    assert not far["ok"] and far["bad_steps"] == 1 and "first step 3" in far["reason"]
    assert not gc.compare_losses(ref, {1: 10.0, 2: 8.0}, rtol=1.0, atol=1.0)["ok"]  # a step missing
    assert not gc.compare_losses({}, {}, rtol=1.0, atol=1.0)["ok"]
    assert not gc.compare_losses(ref, {**ref, 2: float("nan")}, rtol=1.0, atol=1.0)["ok"]


def test_render_markdown_tables():
    report = {
        "date": "2026-12-01T10:11:12", "seconds": 401.0, "command": "python3 launch/gpu_check.py --install .whl",
        "env": {"gpus": ["NVIDIA H200"], "driver": "580.159.04", "cuda": "13.0", "python": "3.12.3",
                "versions": {"torch": "2.11.0", "triton": "3.6.0", "deepspeed": "0.19.8", "webdataset": "1.0.2",
                             "timm": "1.0.31"}},
        "sections": [
            {"name": "kernel-tests", "status": "fail", "seconds": 50.2, "budget_s": 55, "summary": "1 failed"},
            {"name": "deepspeed", "status": "pass", "seconds": 80.0, "budget_s": 100, "summary": "ok",
             "agreement": {"max_abs_diff": 0.0012},
             "runs": [{"run": "tiny-zero0", "stage": 0, "steps": 50, "resumed_at": 25, "exported": True,
                       "first_loss": 4.99, "last_loss": 4.5, "img_s": 900.0, "peak_alloc_gib": 1.25},
                      {"run": "tiny-zero3", "stage": 3, "steps": 50, "resumed_at": 25, "exported": True,
                       "first_loss": 4.99, "last_loss": 4.5, "img_s": 700.0, "peak_alloc_gib": None}]},
            {"name": "paper-model", "status": "pass", "seconds": 90.0, "budget_s": 95, "summary": "ok",
             "runs": [{"stage": 1, "steps": 30, "img_s": 812.4, "step_time": 0.0788, "data_wait": 0.031,
                       "peak_alloc_gib": 21.5, "peak_reserved_gib": 24.0}]},
            {"name": "bench-attention", "status": "pass", "seconds": 30.0, "budget_s": 40, "summary": "ok",
             "ratios": [{"case": "ipg", "B": 64, "N": 16, "L": 226, "mode": "fwd+bwd", "fused_ms": 1.234,
                         "ratios": {"concat+sdpa-flash": 1.5, "torch-path": 3.25}}]},
            {"name": "bench-data", "status": "timeout", "seconds": 85.0, "budget_s": 85, "summary": "8 workers",
             "rows": [{"workers": 8, "img_s": 1600.0, "img_s_per_worker": 200.0, "batches": 750, "seconds": 30.0}]},
        ]}
    lines = gc.render_markdown(report).splitlines()
    assert lines[0] == "### GPU check: 1 x NVIDIA H200 (2026-12-01)"
    assert "driver 580.159.04" in lines[2] and "deepspeed 0.19.8" in lines[2] and "401 s, limit 420 s" in lines[2]
    assert "| kernel-tests | fail | 50 / 55 s | 1 failed |" in lines
    assert "| tiny-zero3 | 50 | 25 | yes | 4.9900 | 4.5000 | 700 | – | 1.20e-03 |" in lines
    assert "| tiny-zero0 | 50 | 25 | yes | 4.9900 | 4.5000 | 900 | 1.25 | – |" in lines
    assert "| 1 | 30 | 812 | 78.8 | 3.1% | 21.50 | 24.00 |" in lines
    assert "| ipg B64 N16 L226 | fwd+bwd | 1.234 | 1.50 | 3.25 |" in lines
    assert "| 8 | 1600 | 200.0 | 750 | 30.0 |" in lines
    assert any("one rank: no collective between ranks" in line for line in lines)
    for line in lines:
        if line.startswith("|"):
            assert line.count("|") >= 5, line
