"""The one prepared command for a lent GPU machine: six sections in at most 420 s, a small report after each.

On a bare machine (no network; the wheels it lacks travel in the git-ignored folder .whl/):

    bash launch/gpu_wheels.sh                                    # here: fills .whl/ (deepspeed, webdataset, needs)
    python3 launch/gpu_check.py --install .whl --report $OUT     # there, from the repository root, .whl carried

--install WHEELDIR runs first, before anything imports torch or mip_dist: `pip install --no-index --no-deps
--no-build-isolation --target SITE` of the wheels, then of this checkout (a regular install built from a fresh copy
of setup.py, mip_dist/ and kernels/, so `mip_dist.kernels` exists). SITE (--site, default /tmp/mip_gpu_check_site)
goes first on PYTHONPATH for every section, with PYTHONSAFEPATH=1 so that the checkout's own mip_dist/ folder,
which has no kernels/, is not imported from the working directory instead. It prints what it installed.

Sections, in this order, each a subprocess (or a few) with its own time budget; time a section leaves unused
passes to the next, and none runs past the plan's total:

  preflight        imports of every package the project needs, nvidia-smi, free /dev/shm and disk, versions
  deepspeed        configs/tiny.yaml on synthetic data, bf16, ZeRO-0 and ZeRO-3: 25 steps, then `--resume auto`
                   to 50 steps, model_final.pt exported; ZeRO-3's per-step losses against ZeRO-0's
  paper-model      configs/mip_vitb16_sysu.yaml (ViT-B/16, random init, bf16, batch 64) on synthetic shards through
                   the training stream, 30 steps with ZeRO-0 and with ZeRO-1: img/s, data wait, peak GPU memory
  kernel-tests     the CUDA cases of the kernel tests, compiled; -v, a per-test timeout, JUnit XML
  bench-attention  fused kernel vs concat + SDPA flash vs the PyTorch path at the paper block and IPG shapes,
                   fwd and fwd+bwd; rows written as they finish
  bench-data       launch/bench_data.py: the training stream's img/s with 8 and 14 loader workers, 30 s each

On one GPU every training run is one rank on `python launch/train.py`: it proves bf16 CUDA training steps,
ZeRO-0/1/3, checkpoint, resume and export on the GPU, and no NCCL collective between ranks (a one-rank all-reduce
returns at once).

--report DIR (default WORKDIR/report) gets small files only, rewritten after every step: gpu_check.json,
gpu_check.md (a table for the README), kernel_tests.xml, bench_attention.json, bench_data.json and tails.log (the
end of every step's log). Training runs, data and full logs go to --workdir (default /tmp/mip_gpu_check). A section
that fails, crashes or runs out of time is recorded and the rest still run; exit status 1 if any did not pass.
Without CUDA, or with --dry-run, it prints the plan with each section's budget and the total, and exits 0.

    python launch/gpu_check.py --dry-run
    python3 launch/gpu_check.py --report /tmp/report --only kernel-tests bench-attention

Top-level imports are the standard library's only: this file must start on a machine where the project's
requirements are not installed yet.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
ME = str(Path(__file__).resolve())
TOTAL_BUDGET_S = 420  # the whole command, install included: a lent machine gives about 15 minutes, start included
INSTALL_BUDGET_S = 25  # two offline `pip install` calls (the wheels, then this checkout)
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "mip_gpu_check"
DEFAULT_SITE = Path(tempfile.gettempdir()) / "mip_gpu_check_site"
TINY_CONFIG, PAPER_CONFIG = "configs/tiny.yaml", "configs/mip_vitb16_sysu.yaml"
TINY_STEPS_PER_EPOCH = 25  # the first run 1 epoch, the resumed one to 2: 50 steps
PAPER_STEPS, PAPER_LOG_EVERY = 30, 5
KERNEL_TESTS = ("tests/test_kernel_attention.py", "tests/test_kernel_model.py")
KERNEL_TEST_SELECT = "cuda or gpu_grid"  # the device-parametrised CUDA cases and the CUDA-only grid test
BENCH_IMPLS = ("fused-triton", "concat+sdpa-flash", "torch-path")
DATA_WORKERS, DATA_SECONDS = (8, 14), 30
PASS, FAIL, TIMEOUT, NOT_RUN = "pass", "fail", "timeout", "not run"
RESULT_TAG = "GPU_CHECK_RESULT "
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,memory.used",
              "--format=csv,noheader"]
# module -> distribution, for the version; the module must import on the GPU machine for the sections to run
NEEDED = {"torch": "torch", "torchvision": "torchvision", "triton": "triton", "deepspeed": "deepspeed",
          "webdataset": "webdataset", "timm": "timm", "accelerate": "accelerate", "yaml": "pyyaml", "tqdm": "tqdm",
          "tensorboard": "tensorboard", "matplotlib": "matplotlib", "safetensors": "safetensors", "numpy": "numpy",
          "sklearn": "scikit-learn", "PIL": "pillow", "pydantic": "pydantic", "hjson": "hjson",
          "braceexpand": "braceexpand", "pytest": "pytest", "pytest_timeout": "pytest-timeout",
          "xdist": "pytest-xdist", "mip_dist": "mip-dist", "mip_dist.kernels": "mip-dist",
          "mip_dist.engine.trainer": "mip-dist"}
SHOWN_VERSIONS = ("torch", "triton", "deepspeed", "webdataset", "timm")


@dataclass
class Step:
    """One command of a section, with its share of the section's time."""

    name: str
    cmd: list[str]
    budget_s: int
    needs: Optional[str] = None  # a step of the same section that must have passed first
    clear: tuple[Path, ...] = ()  # files and run directories removed first: a rerun never judges old results
    cwd: Path = REPO


@dataclass
class Section:
    """A numbered part of the check: what it shows, its steps, and how their results become a verdict."""

    name: str
    what: str
    steps: list[Step]
    judge: Callable[["Section", list[dict], "Context"], dict] = field(default=lambda s, r, c: judge_exit_codes(r))

    @property
    def budget_s(self) -> int:
        """The section's time: the sum of its steps' (test: the plan's sum stays within the total)."""
        return sum(step.budget_s for step in self.steps)


@dataclass
class Context:
    """Where a run writes (bulky runs vs the small report) and what it compares with."""

    workdir: Path
    report: Path
    python: str = sys.executable
    device: str = "cuda"
    loss_rtol: float = 0.05
    loss_atol: float = 0.02
    install: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- plan
def tiny_run_dir(ctx: Context, stage: int) -> Path:
    """Where the tiny ZeRO `stage` run writes (both of its invocations)."""
    return ctx.workdir / "train" / f"tiny-zero{stage}"


def paper_run_dir(ctx: Context, stage: int) -> Path:
    """Where the paper-model ZeRO `stage` run writes."""
    return ctx.workdir / "train" / f"paper-zero{stage}"


def tiny_overrides(ctx: Context, stage: int, epochs: int) -> list[str]:
    """configs/tiny.yaml as a bf16 GPU run of `epochs` x 25 steps on a small synthetic set, one log per step."""
    data = ctx.workdir / "data" / "tiny"
    return [f"train.zero_stage={stage}", "train.precision=bf16", f"train.device={ctx.device}", f"train.epochs={epochs}",
            f"data.steps_per_epoch={TINY_STEPS_PER_EPOCH}", "train.log_every=1", "train.eval_every_epochs=0",
            "loss.msel_start_epoch=1", f"data.root={data / 'synthetic'}", f"data.shards={data / 'shards'}",
            "data.synthetic_ids=16", "data.synthetic_test_ids=4", "data.synthetic_images_per_camera=2",
            "data.workers=1", f"train.output_dir={ctx.workdir / 'train'}", f"train.run_name=tiny-zero{stage}"]


def paper_overrides(ctx: Context, stage: int) -> list[str]:
    """The paper config at random init (nothing downloads) on synthetic 256x128 shards, 30 steps, batch 64."""
    data = ctx.workdir / "data" / "paper"
    return ["model.pretrained=", "data.dataset=synthetic", f"data.root={data / 'synthetic'}",
            f"data.shards={data / 'shards'}", "data.synthetic_ids=32", "data.synthetic_test_ids=4",
            "data.synthetic_images_per_camera=3", f"data.steps_per_epoch={PAPER_STEPS}", "train.epochs=1",
            f"train.log_every={PAPER_LOG_EVERY}", "train.eval_every_epochs=0", f"train.zero_stage={stage}",
            "train.precision=bf16", f"train.device={ctx.device}", f"train.output_dir={ctx.workdir / 'train'}",
            f"train.run_name=paper-zero{stage}"]


def worker_result(ctx: Context, name: str) -> Path:
    """The JSON a worker subprocess leaves (preflight facts, a training run's peak memory)."""
    return ctx.workdir / f"{name}.result.json"


def train_cmd(ctx: Context, name: str, config: str, overrides: list[str], resume: bool = False) -> list[str]:
    """launch/train.py run in-process by this script's worker, which adds the run's peak GPU memory."""
    return [ctx.python, ME, "--train-worker", str(worker_result(ctx, name)), "--", "--config", config,
            *overrides, *(["--resume", "auto", "--allow-config-change", "train.epochs"] if resume else [])]


def build_plan(ctx: Context) -> list[Section]:
    """Every section in run order with its steps, commands and budgets."""
    py = ctx.python
    deepspeed_steps = []
    for stage in (0, 3):
        name = f"tiny-zero{stage}"
        deepspeed_steps += [
            Step(f"zero{stage}", train_cmd(ctx, name, TINY_CONFIG, tiny_overrides(ctx, stage, 1)),
                 35 if stage == 0 else 25,  # the first run compiles the kernels
                 clear=(tiny_run_dir(ctx, stage), worker_result(ctx, name))),
            Step(f"zero{stage}-resume", train_cmd(ctx, f"{name}-resume", TINY_CONFIG, tiny_overrides(ctx, stage, 2),
                                                  resume=True), 20, needs=f"zero{stage}",
                 clear=(worker_result(ctx, f"{name}-resume"),))]
    paper_steps = [Step(f"zero{stage}", train_cmd(ctx, f"paper-zero{stage}", PAPER_CONFIG, paper_overrides(ctx, stage)),
                        budget, clear=(paper_run_dir(ctx, stage), worker_result(ctx, f"paper-zero{stage}")))
                   for stage, budget in ((0, 55), (1, 40))]
    # run from tests/: pytest-xdist workers may put their working directory first on sys.path, and from the
    # repository root that is the checkout's mip_dist/ (no kernels/) instead of the installed package
    pytest_cmd = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-n", "4", "--timeout", "45",
                  "--rootdir", str(REPO), "--junitxml", str(ctx.report / "kernel_tests.xml"), "-k", KERNEL_TEST_SELECT,
                  *(str(REPO / f) for f in KERNEL_TESTS)]
    bench_cmd = [py, str(REPO / "launch" / "bench_attention.py"), "--batch", "64", "--tokens", "211",
                 "--impls", *BENCH_IMPLS, "--modes", "fwd", "fwd+bwd", "--warmup", "10", "--rep", "50",
                 "--out", str(ctx.report / "bench_attention.json")]
    data_cmd = [py, str(REPO / "launch" / "bench_data.py"), "--workers", *map(str, DATA_WORKERS),
                "--seconds", str(DATA_SECONDS), "--json", str(ctx.report / "bench_data.json")]
    return [
        Section("preflight", "imports of every package needed, nvidia-smi, free /dev/shm and disk, versions",
                [Step("imports", [py, ME, "--preflight-worker", str(worker_result(ctx, "preflight"))], 20,
                      clear=(worker_result(ctx, "preflight"),))],
                judge_preflight),
        Section("deepspeed", f"{TINY_CONFIG} on synthetic data, one rank, bf16 CUDA steps with ZeRO-0 and ZeRO-3: "
                             f"{TINY_STEPS_PER_EPOCH} steps, checkpoint, --resume auto to {2 * TINY_STEPS_PER_EPOCH}, "
                             "model_final.pt; ZeRO-3 losses vs ZeRO-0's (no collective between ranks on one GPU)",
                deepspeed_steps, judge_deepspeed),
        Section("paper-model", f"{PAPER_CONFIG} (ViT-B/16, random init), bf16, batch 64, synthetic shards through the "
                               f"training stream, {PAPER_STEPS} steps with ZeRO-0 and ZeRO-1: img/s, data wait, "
                               "peak GPU memory", paper_steps, judge_paper),
        Section("kernel-tests", "the CUDA cases of the kernel tests, compiled (TRITON_INTERPRET unset), -v, "
                                "45 s per test, 4 processes, JUnit XML",
                [Step("pytest", pytest_cmd, 55, cwd=REPO / "tests", clear=(ctx.report / "kernel_tests.xml",))],
                judge_pytest),
        Section("bench-attention", "fused vs concat+SDPA flash vs the PyTorch path, paper block (B 64, N 211) and "
                                   "IPG shapes, fwd and fwd+bwd",
                [Step("bench", bench_cmd, 40, clear=(ctx.report / "bench_attention.json",))],
                judge_bench_attention),
        Section("bench-data", f"training stream img/s with {' and '.join(map(str, DATA_WORKERS))} loader workers, "
                              f"{DATA_SECONDS} s each",
                [Step("bench", data_cmd, 85, clear=(ctx.report / "bench_data.json",))], judge_bench_data),
    ]


def plan_total(plan: list[Section]) -> int:
    """Seconds the sections may take together."""
    return sum(section.budget_s for section in plan)


def print_plan(plan: list[Section], ctx: Context, install: bool) -> None:
    """Each section with its budget, what it shows and its commands; then the total against the limit."""
    print(f"gpu_check plan: {len(plan)} sections; report -> {ctx.report}; runs -> {ctx.workdir}")
    if install:
        print(f"  0. install ({INSTALL_BUDGET_S} s): offline pip install of the wheels and this checkout")
    for i, section in enumerate(plan, 1):
        print(f"  {i}. {section.name} ({section.budget_s} s): {section.what}")
        for step in section.steps:
            where = "" if step.cwd == REPO else f"(in {step.cwd.relative_to(REPO)}/) "
            print(f"      {step.name} ({step.budget_s} s) {where}$ {shlex.join(step.cmd)}")
    total = plan_total(plan) + INSTALL_BUDGET_S
    print(f"total: {plan_total(plan)} s of sections + {INSTALL_BUDGET_S} s install = {total} s "
          f"(limit {TOTAL_BUDGET_S} s)")


# ----------------------------------------------------------------------------------------------- pure helpers
def read_json(path: Path) -> Optional[Any]:
    """A JSON file's content, or None when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def train_records(metrics_path: Path) -> list[dict]:
    """The training records of a run's metrics.jsonl, in order ([] when there is none yet)."""
    if not metrics_path.is_file():
        return []
    records = []
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if record.get("kind") == "train":
            records.append(record)
    return records


def losses_of(train: list[dict]) -> dict[int, float]:
    """Step -> logged training loss of a run's training records."""
    return {int(r["step"]): float(r["loss"]) for r in train if "loss" in r}


def compare_losses(ref: dict[int, float], other: dict[int, float], rtol: float, atol: float) -> dict[str, Any]:
    """Do two runs log the same steps with losses within |other - ref| <= atol + rtol*|ref| at every step?"""
    out: dict[str, Any] = {"rtol": rtol, "atol": atol, "steps": len(ref), "ok": False}
    if not ref or set(ref) != set(other):
        out["reason"] = f"logged steps differ: {len(ref)} vs {len(other)} (missing {sorted(set(ref) ^ set(other))[:5]})"
        return out
    if not all(math.isfinite(v) for v in (*ref.values(), *other.values())):
        out["reason"] = "non-finite loss"
        return out
    diffs = {s: abs(other[s] - ref[s]) for s in ref}
    worst = max(diffs, key=lambda s: diffs[s] - atol - rtol * abs(ref[s]))
    bad = [s for s in sorted(ref) if diffs[s] > atol + rtol * abs(ref[s])]
    out.update(max_abs_diff=max(diffs.values()), max_rel_diff=max(diffs[s] / max(abs(ref[s]), 1e-12) for s in ref),
               worst_step=worst, bad_steps=len(bad), ok=not bad)
    if bad:
        s = bad[0]
        out["reason"] = f"{len(bad)} step(s) out of tolerance, first step {s}: {other[s]:.6g} vs {ref[s]:.6g}"
    return out


def bench_ratios(rows: list[dict]) -> list[dict[str, Any]]:
    """Per (case, B, N, mode): fused-triton ms and every other impl's time / fused time, from bench_attention
    rows (case: the paper's block call or the IPG call)."""
    table: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["case"], r["B"], r["N"], r["mode"])
        entry = table.setdefault(key, {"case": r["case"], "B": r["B"], "N": r["N"], "L": r.get("L"),
                                       "mode": r["mode"], "fused_ms": None, "ratios": {}})
        if r.get("status") != "ok":
            continue
        if r["impl"] == "fused-triton":
            entry["fused_ms"] = r["ms"]
        elif "fused_speedup" in r:
            entry["ratios"][r["impl"]] = r["fused_speedup"]
    return list(table.values())


def pytest_counts(log_text: str, junit: Optional[Path]) -> dict[str, int]:
    """passed / failed / errors / skipped from the JUnit XML when pytest wrote it, else from the -v lines (a
    killed run writes no XML, but its log names every test that finished)."""
    if junit is not None and junit.is_file():
        try:
            root = ET.parse(junit).getroot()
            suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
            total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
            return {"passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
                    "failed": total["failures"], "errors": total["errors"], "skipped": total["skipped"]}
        except (ET.ParseError, ValueError):
            pass
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    word = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped"}
    for line in log_text.splitlines():
        m = re.search(r"\b(PASSED|FAILED|ERROR|SKIPPED)\b", line)
        if m and "::" in line:
            counts[word[m.group(1)]] += 1
    return counts


def steady(records: list[dict], key: str) -> Optional[float]:
    """Mean of `key` over the logged windows after the first (compilation and warm-up are in the first)."""
    values = [float(r[key]) for r in records[1:] if r.get(key) is not None] or \
        [float(r[key]) for r in records if r.get(key) is not None]
    return sum(values) / len(values) if values else None


def exit_code(sections: list[dict]) -> int:
    """1 if any section did not pass."""
    return int(any(s["status"] != PASS for s in sections))


# ----------------------------------------------------------------------------------------------- judges
def judge_exit_codes(steps: list[dict]) -> dict[str, Any]:
    """Pass when every step exited 0."""
    ok = bool(steps) and all(s["status"] == PASS for s in steps)
    return {"ok": ok, "summary": ", ".join(f"{s['name']} {s['status']}" for s in steps)}


def step_by_name(steps: list[dict]) -> dict[str, dict]:
    """The section's step results by step name."""
    return {s["name"]: s for s in steps}


def log_text(step: Optional[dict]) -> str:
    """A step's full log ('' when it did not run)."""
    if not step or not step.get("log") or not Path(step["log"]).is_file():
        return ""
    return Path(step["log"]).read_text(errors="replace")


def judge_preflight(section: Section, steps: list[dict], ctx: Context) -> dict[str, Any]:
    """Pass when every needed package imports and torch sees a CUDA GPU; the versions go to the report's env."""
    info = read_json(worker_result(ctx, "preflight")) or {}
    missing = {m: r["error"] for m, r in info.get("imports", {}).items() if not r.get("ok")}
    ok = steps[0]["status"] == PASS and bool(info) and not missing and info.get("cuda_available", False)
    if not info:
        summary = "no preflight result"
    elif missing:
        summary = "missing: " + "; ".join(f"{m} ({e})" for m, e in missing.items())
    else:
        gpus = info.get("gpus") or ["no CUDA GPU"]
        summary = (f"{len(info.get('gpus', []))} x {', '.join(sorted(set(gpus)))}; "
                   + ", ".join(f"{k} {info.get('versions', {}).get(k)}" for k in SHOWN_VERSIONS)
                   + f"; /dev/shm {info.get('free_gib', {}).get('/dev/shm', '?')} GiB, "
                     f"workdir {info.get('free_gib', {}).get('workdir', '?')} GiB free")
    return {"ok": ok, "summary": summary, "env": info}


def tiny_run(ctx: Context, stage: int, first: Optional[dict], resumed: Optional[dict]) -> dict[str, Any]:
    """One tiny ZeRO stage: the first run ended at step 25, the second resumed there and exported at 50."""
    run_dir = tiny_run_dir(ctx, stage)
    half, total = TINY_STEPS_PER_EPOCH, 2 * TINY_STEPS_PER_EPOCH
    train = train_records(run_dir / "metrics.jsonl")
    losses = losses_of(train)
    finished = read_json(run_dir / "FINISHED") or {}
    resume_line = re.search(r"resumed from \S*step0*(\d+)", log_text(resumed))
    out: dict[str, Any] = {
        "run": f"tiny-zero{stage}", "stage": stage, "steps": len(losses),
        "first_run": bool(first) and first["status"] == PASS and f"finished: step {half}," in log_text(first),
        "resumed_at": int(resume_line.group(1)) if resume_line else None,
        "exported": (run_dir / "model_final.pt").is_file() and finished.get("step") == total,
        "finite": all(math.isfinite(v) for v in losses.values()), "losses": losses,
        "img_s": steady(train, "img_s"),
        "peak_alloc_gib": (read_json(worker_result(ctx, f"tiny-zero{stage}-resume")) or {}).get("peak_alloc_gib"),
    }
    if losses:
        out.update(first_loss=losses[min(losses)], last_loss=losses[max(losses)])
    out["ok"] = (out["first_run"] and bool(resumed) and resumed["status"] == PASS and out["resumed_at"] == half
                 and out["exported"] and sorted(losses) == list(range(1, total + 1)) and out["finite"])
    return out


def judge_deepspeed(section: Section, steps: list[dict], ctx: Context) -> dict[str, Any]:
    """Both stages trained, resumed and exported, and ZeRO-3's losses match ZeRO-0's at every step (bf16
    tolerance). One rank: nothing here depends on, or claims, an NCCL collective."""
    by = step_by_name(steps)
    runs = [tiny_run(ctx, stage, by.get(f"zero{stage}"), by.get(f"zero{stage}-resume")) for stage in (0, 3)]
    agreement = compare_losses(runs[0]["losses"], runs[1]["losses"], ctx.loss_rtol, ctx.loss_atol)
    parts = []
    for r in runs:
        state = ("ok" if r["ok"] else "FAILED") + f" {r['steps']}/{2 * TINY_STEPS_PER_EPOCH} steps"
        state += f", resumed at {r['resumed_at']}" if r["resumed_at"] is not None else ", not resumed"
        state += ", exported" if r["exported"] else ", no model_final.pt"
        parts.append(f"ZeRO-{r['stage']} {state}")
    if "max_abs_diff" in agreement:
        parts.append(f"ZeRO-3 vs ZeRO-0 losses max |d| {agreement['max_abs_diff']:.2e}"
                     + ("" if agreement["ok"] else f" ({agreement['reason']})"))
    else:
        parts.append(f"loss agreement: {agreement['reason']}")
    for r in runs:
        r.pop("losses")
    return {"ok": all(r["ok"] for r in runs) and agreement["ok"], "summary": "; ".join(parts), "runs": runs,
            "agreement": agreement}


def judge_paper(section: Section, steps: list[dict], ctx: Context) -> dict[str, Any]:
    """Each ZeRO stage logged all its steps with finite losses; img/s and data wait after the first window."""
    by = step_by_name(steps)
    runs, parts = [], []
    for stage in (0, 1):
        step = by.get(f"zero{stage}")
        train = train_records(paper_run_dir(ctx, stage) / "metrics.jsonl")
        losses = losses_of(train)
        worker = read_json(worker_result(ctx, f"paper-zero{stage}")) or {}
        r = {"run": f"paper-zero{stage}", "stage": stage, "steps": max(losses, default=0),
             "img_s": steady(train, "img_s"), "data_wait": steady(train, "data_wait"),
             "step_time": steady(train, "step_time"), "peak_alloc_gib": worker.get("peak_alloc_gib"),
             "peak_reserved_gib": worker.get("peak_reserved_gib"),
             "last_loss": losses[max(losses)] if losses else None}
        r["ok"] = (bool(step) and step["status"] == PASS and r["steps"] == PAPER_STEPS
                   and all(math.isfinite(v) for v in losses.values()))
        runs.append(r)
        if r["img_s"] is None:
            parts.append(f"ZeRO-{stage}: {r['steps']}/{PAPER_STEPS} steps, no img/s logged")
        else:
            peak = "?" if r["peak_alloc_gib"] is None else f"{r['peak_alloc_gib']:.1f}"
            parts.append(f"ZeRO-{stage}: {r['img_s']:.0f} img/s, data wait {100 * r['data_wait']:.0f}%, "
                         f"peak {peak} GiB, {r['steps']}/{PAPER_STEPS} steps")
    return {"ok": all(r["ok"] for r in runs), "summary": "; ".join(parts), "runs": runs}


def judge_pytest(section: Section, steps: list[dict], ctx: Context) -> dict[str, Any]:
    """Some tests passed and none failed (counts from the XML, or the -v lines of a killed run)."""
    step = steps[0]
    junit = ctx.report / "kernel_tests.xml"
    counts = pytest_counts(log_text(step), junit if "started" in step else None)  # the step cleared an old one
    ok = step["status"] == PASS and counts["passed"] > 0 and not counts["failed"] and not counts["errors"]
    return {"ok": ok, "counts": counts, "summary": ", ".join(f"{n} {k}" for k, n in counts.items() if n)
            or "no test finished"}


def judge_bench_attention(section: Section, steps: list[dict], ctx: Context) -> dict[str, Any]:
    """Every shape and mode has a fused-kernel time; the others' times as ratios to it."""
    rows = (read_json(ctx.report / "bench_attention.json") or {}).get("rows", [])
    ratios = bench_ratios(rows)
    fused = [r for r in ratios if r["fused_ms"] is not None]
    ok = steps[0]["status"] == PASS and bool(fused) and len(fused) == len(ratios)
    parts = [f"{r['case']} {r['mode']} {r['fused_ms']:.3f} ms (" +
             ", ".join(f"{k} x{v:.2f}" for k, v in r["ratios"].items()) + ")" for r in fused]
    return {"ok": ok, "ratios": ratios, "summary": "fused-triton " + "; ".join(parts) if parts else
            "no fused-triton timings"}


def judge_bench_data(section: Section, steps: list[dict], ctx: Context) -> dict[str, Any]:
    """A row for every worker count asked for."""
    rows = (read_json(ctx.report / "bench_data.json") or {}).get("rows", [])
    seen = {int(r["workers"]) for r in rows if "workers" in r}
    ok = steps[0]["status"] == PASS and set(DATA_WORKERS) <= seen
    parts = [f"{r['workers']} workers {r['img_s']:.0f} img/s ({r['img_s_per_worker']:.0f}/worker)" for r in rows
             if r.get("img_s") is not None and r.get("img_s_per_worker") is not None]
    return {"ok": ok, "rows": rows, "summary": "; ".join(parts) or "no rows written"}


# ----------------------------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    """A table cell: formatted number, or a dash where the check produced none."""
    return missing if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """The README table: one row per section, then the training runs, attention ratios and data rows."""
    env = report.get("env", {})
    versions = env.get("versions", {})
    gpus = env.get("gpus") or ["no GPU seen"]
    lines = [f"### GPU check: {len(env.get('gpus', []))} x {', '.join(sorted(set(gpus)))} "
             f"({report.get('date', '')[:10]})", "",
             f"driver {env.get('driver', '?')}, CUDA {env.get('cuda', '?')}, Python {env.get('python', '?')}, "
             + ", ".join(f"{k} {versions.get(k, '?')}" for k in SHOWN_VERSIONS)
             + f"; `{report.get('command', 'python3 launch/gpu_check.py')}` ({report.get('seconds', 0):.0f} s, "
               f"limit {report.get('limit_s', TOTAL_BUDGET_S)} s)", "",
             "| section | status | time / budget | result |", "|---|---|---|---|"]
    sections = report.get("sections", [])
    for s in sections:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.0f} / {s['budget_s']} s | "
                     f"{s.get('summary', '')} |")
    by = {s["name"]: s for s in sections}
    if by.get("deepspeed", {}).get("runs"):
        agree = by["deepspeed"].get("agreement", {})
        lines += ["", f"Tiny DeepSpeed runs ({TINY_CONFIG}, synthetic data, bf16, one rank: no collective between "
                      f"ranks): {TINY_STEPS_PER_EPOCH} steps, checkpoint, `--resume auto` to "
                      f"{2 * TINY_STEPS_PER_EPOCH}, model_final.pt", "",
                  "| run | steps | resumed at | exported | first loss | last loss | img/s | peak GiB | "
                  "max abs diff vs ZeRO-0 |", "|---|---|---|---|---|---|---|---|---|"]
        for r in by["deepspeed"]["runs"]:
            diff = _fmt(agree.get("max_abs_diff"), ".2e") if r["stage"] else "–"
            lines.append(f"| {r['run']} | {r['steps']} | {_fmt(r.get('resumed_at'), 'd')} | "
                         f"{'yes' if r.get('exported') else 'no'} | {_fmt(r.get('first_loss'), '.4f')} | "
                         f"{_fmt(r.get('last_loss'), '.4f')} | {_fmt(r.get('img_s'), '.0f')} | "
                         f"{_fmt(r.get('peak_alloc_gib'), '.2f')} | {diff} |")
    if by.get("paper-model", {}).get("runs"):
        lines += ["", f"Paper model ({PAPER_CONFIG}, ViT-B/16 256x128, random init, bf16, batch 64, synthetic shards "
                      f"through the training stream, {PAPER_STEPS} steps; img/s and data wait after the first "
                      f"{PAPER_LOG_EVERY} steps)", "",
                  "| ZeRO | steps | img/s | ms/step | data wait | peak allocated GiB | peak reserved GiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in by["paper-model"]["runs"]:
            wait = None if r.get("data_wait") is None else 100 * r["data_wait"]
            ms = None if r.get("step_time") is None else 1e3 * r["step_time"]
            lines.append(f"| {r['stage']} | {r['steps']} | {_fmt(r.get('img_s'), '.0f')} | {_fmt(ms, '.1f')} | "
                         f"{_fmt(wait, '.1f')}% | {_fmt(r.get('peak_alloc_gib'), '.2f')} | "
                         f"{_fmt(r.get('peak_reserved_gib'), '.2f')} |")
    ratios = by.get("bench-attention", {}).get("ratios") or []
    if ratios:
        impls = sorted({k for row in ratios for k in row["ratios"]})
        lines += ["", "Fused prompt attention: time of each implementation / fused-triton's (same shape and mode; "
                      ">1 = fused faster)", "",
                  "| shape | mode | fused-triton ms | " + " | ".join(impls) + " |",
                  "|---|---|---|" + "---|" * len(impls)]
        for row in ratios:
            cells = [_fmt(row["ratios"].get(i), ".2f") for i in impls]
            lines.append(f"| {row['case']} B{row['B']} N{row['N']} L{row['L']} | {row['mode']} | "
                         f"{_fmt(row['fused_ms'], '.3f')} | " + " | ".join(cells) + " |")
    rows = by.get("bench-data", {}).get("rows") or []
    if rows:
        lines += ["", "Training stream (launch/bench_data.py): decoded + augmented images/s", "",
                  "| workers | img/s | img/s per worker | batches | seconds |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.get('workers')} | {_fmt(r.get('img_s'), '.0f')} | "
                         f"{_fmt(r.get('img_s_per_worker'), '.1f')} | {r.get('batches', '–')} | "
                         f"{_fmt(r.get('seconds'), '.1f')} |")
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Replace a report file whole, so a reader (or a kill) never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], folder: Path) -> None:
    """gpu_check.json, gpu_check.md and tails.log in the report folder (rewritten after every step)."""
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "gpu_check.json", json.dumps(report, indent=2, default=str))
    _write_atomic(folder / "gpu_check.md", render_markdown(report))
    tails = []
    for s in report.get("sections", []):
        for step in s.get("steps", []):
            tails.append(f"==== {s['name']}/{step['name']}: {step['status']} (rc {step.get('returncode')}, "
                         f"{step.get('seconds', 0):.0f} s)\n{step.get('tail', '')}")
    _write_atomic(folder / "tails.log", "\n".join(tails) + "\n")


# ----------------------------------------------------------------------------------------------- running
def child_env() -> dict[str, str]:
    """This environment without TRITON_INTERPRET (compiled kernels), unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_command(cmd: list[str], timeout_s: float, log_path: Path, cwd: Path = REPO) -> tuple[Optional[int], float]:
    """Run `cmd` in `cwd` into `log_path`; kill its whole process group on timeout (returns None)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as fh:
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            fh.write(f"could not start: {exc}\n")
            return 127, time.monotonic() - t0
        try:
            rc: Optional[int] = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            rc = None
        try:  # a timed-out command and everything it started, or a finished one's leftovers (loader workers)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if rc is None:
            proc.wait()
    return rc, time.monotonic() - t0


def tail(text: str, n: int = 2500) -> str:
    """The end of a step's output: where its error is, small enough for the report."""
    return text[-n:]


def run_step(step: Step, section: Section, deadline: float, done: dict[str, dict], ctx: Context) -> dict[str, Any]:
    """One step within what is left of its time; never raises."""
    res: dict[str, Any] = {"name": step.name, "cmd": shlex.join(step.cmd), "cwd": str(step.cwd),
                           "budget_s": step.budget_s, "seconds": 0.0, "returncode": None}
    if step.needs and done.get(step.needs, {}).get("status") != PASS:
        return {**res, "status": NOT_RUN, "tail": f"skipped: {step.needs} did not pass"}
    left = deadline - time.monotonic()
    if left < 1:
        return {**res, "status": NOT_RUN, "tail": "no time left"}
    for path in step.clear:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    log_path = ctx.workdir / "logs" / f"{section.name}-{step.name}.log"
    res.update(started=time.time(), log=str(log_path), limit_s=round(left, 1))
    rc, seconds = run_command(step.cmd, left, log_path, step.cwd)
    text = log_path.read_text(errors="replace")
    res.update(returncode=rc, seconds=seconds, tail=tail(text),
               status=PASS if rc == 0 else TIMEOUT if rc is None else FAIL)
    return res


def run_section(section: Section, deadline: float, ctx: Context,
                on_step: Callable[[list[dict]], None]) -> dict[str, Any]:
    """The section's steps in order, each by its own deadline (unused time passes on), then its verdict."""
    t0 = time.monotonic()
    steps: list[dict] = []
    for j, step in enumerate(section.steps):
        step_deadline = deadline - sum(s.budget_s for s in section.steps[j + 1:])
        steps.append(run_step(step, section, step_deadline, step_by_name(steps), ctx))
        on_step(steps)
    res: dict[str, Any] = {"name": section.name, "what": section.what, "budget_s": section.budget_s, "steps": steps}
    try:
        verdict = section.judge(section, steps, ctx)
    except Exception as exc:  # noqa: BLE001 - a judge's crash is a result; the next sections still run
        verdict = {"ok": False, "summary": f"judging failed: {type(exc).__name__}: {exc}"}
    ok = verdict.pop("ok")
    timed_out = any(s["status"] == TIMEOUT for s in steps)
    status = PASS if ok else TIMEOUT if timed_out else NOT_RUN if all(s["status"] == NOT_RUN for s in steps) else FAIL
    res.update(verdict, status=status, seconds=time.monotonic() - t0)
    return res


def run_plan(plan: list[Section], ctx: Context, command: str = "", start: Optional[float] = None) -> dict[str, Any]:
    """Every section in order; section i must end by `start` (default now) + the budgets of sections 1..i. The
    report is rewritten after every step, so a run killed from outside still leaves what it had."""
    t_start = time.monotonic() if start is None else start
    wall0 = time.monotonic() - ctx.install.get("seconds", 0.0)  # the report's seconds: install included
    report: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "repo": str(REPO),
                              "command": command, "limit_s": TOTAL_BUDGET_S, "plan_s": plan_total(plan),
                              "install": ctx.install, "workdir": str(ctx.workdir), "sections": []}
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    write_report(report, ctx.report)
    for i, section in enumerate(plan):
        deadline = t_start + sum(s.budget_s for s in plan[:i + 1])
        print(f"== [{i + 1}/{len(plan)}] {section.name} ({section.budget_s} s): {section.what}", flush=True)

        def progress(steps: list[dict], name: str = section.name, budget: int = section.budget_s) -> None:
            """Each finished step goes into the report at once (the section's verdict comes after)."""
            s = steps[-1]
            print(f"   {name}/{s['name']}: {s['status']} ({s['seconds']:.0f} s)", flush=True)
            running = {"name": name, "status": "running", "budget_s": budget, "steps": steps}
            write_report({**report, "sections": [*report["sections"], running],
                          "seconds": time.monotonic() - wall0}, ctx.report)

        res = run_section(section, deadline, ctx, progress)
        report["sections"].append(res)
        if "env" in res:
            report["env"] = res["env"]
        report["seconds"] = time.monotonic() - wall0
        print(f"   {res['status']} ({res['seconds']:.0f} s): {res.get('summary', '')}", flush=True)
        write_report(report, ctx.report)
    report["failed"] = [s["name"] for s in report["sections"] if s["status"] != PASS]
    report["ok"] = not report["failed"]
    write_report(report, ctx.report)
    return report


# ----------------------------------------------------------------------------------------------- install
def checkout_copy(dest: Path) -> Path:
    """setup.py, mip_dist/ and kernels/ copied to a fresh folder for pip to build in: a build/ folder left in the
    checkout (kept between calls on a warm machine) could otherwise put stale modules into the install."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in ("setup.py", "setup.cfg"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("mip_dist", "kernels"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def install(wheeldir: Path, site: Path, budget_s: float = INSTALL_BUDGET_S) -> dict[str, Any]:
    """pip-install the wheels, then this checkout, into `site` offline (no index, no dependency resolution, no
    build isolation) and put `site` first on this process's and every child's path. Imports nothing else."""
    t0 = time.monotonic()
    wheels = sorted(str(p) for p in Path(wheeldir).resolve().glob("*.whl"))  # pip runs in the copy's folder
    base = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation", "--no-compile",
            "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(site)]
    out: dict[str, Any] = {"wheeldir": str(wheeldir), "site": str(site), "wheels": [Path(w).name for w in wheels],
                           "ok": True, "errors": []}
    source = checkout_copy(Path(str(site) + "-src"))
    for what, args in (("wheels", wheels), ("checkout", [str(source)])):
        if not args:
            out["errors"].append(f"no wheels in {wheeldir}")
            out["ok"] = False
            continue
        left = budget_s - (time.monotonic() - t0)
        try:
            r = subprocess.run([*base, *args], capture_output=True, text=True, timeout=max(left, 1.0), cwd=source)
            if r.returncode != 0:
                out["ok"] = False
                out["errors"].append(f"{what}: pip exited {r.returncode}: {(r.stderr or r.stdout)[-1500:]}")
        except (OSError, subprocess.TimeoutExpired) as exc:
            out["ok"] = False
            out["errors"].append(f"{what}: {type(exc).__name__}: {exc}")
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(site) + (os.pathsep + old if old else "")
    os.environ["PYTHONSAFEPATH"] = "1"  # children: not the checkout's mip_dist/ (no kernels/) from the cwd
    sys.path.insert(0, str(site))
    out["installed"] = sorted(p.name[:-len(".dist-info")] for p in Path(site).glob("*.dist-info")) \
        if Path(site).is_dir() else []
    out["seconds"] = time.monotonic() - t0
    return out


def print_install(result: dict[str, Any]) -> None:
    """What --install put where, and what went wrong."""
    print(f"install: {len(result['wheels'])} wheels from {result['wheeldir']} + this checkout -> {result['site']} "
          f"({result['seconds']:.1f} s)")
    for name in result["installed"]:
        print(f"   {name}")
    for err in result["errors"]:
        print(f"   error: {err}")
    print(f"   PYTHONPATH={os.environ.get('PYTHONPATH')} PYTHONSAFEPATH=1", flush=True)


# ----------------------------------------------------------------------------------------------- workers
def preflight_worker(result: Path) -> int:
    """Subprocess body: import every needed package, read versions, GPUs, driver and free space."""
    import importlib
    import importlib.metadata

    info: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable, "imports": {},
                            "versions": {}, "gpus": [], "cuda_available": False}
    result.parent.mkdir(parents=True, exist_ok=True)
    for module, dist in NEEDED.items():
        result.write_text(json.dumps(info, indent=2))  # a preflight cut short still tells what imported
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(module)
            info["imports"][module] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2),
                                       "from": str(Path(getattr(mod, "__file__", "") or "?").parent)}
            try:
                info["versions"][module] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                info["versions"][module] = getattr(mod, "__version__", None)
        except Exception as exc:  # noqa: BLE001 - a missing or broken package is the result
            info["imports"][module] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    try:
        import torch

        info.update(cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            info["bf16"] = torch.cuda.is_bf16_supported()
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:  # noqa: BLE001
        info["torch_error"] = f"{type(exc).__name__}: {exc}"
    try:
        smi = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=15)
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
        drivers = {line.split(",")[2].strip() for line in info["nvidia_smi"] if line.count(",") >= 3}
        info["driver"] = ", ".join(sorted(drivers)) or None
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    info["free_gib"] = {}
    for label, path in (("/dev/shm", Path("/dev/shm")), ("workdir", result.parent), ("/tmp", Path("/tmp"))):
        try:
            info["free_gib"][label] = round(shutil.disk_usage(path).free / 2**30, 1)
        except OSError:
            info["free_gib"][label] = None
    info["cpus"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info["ok"] = all(r["ok"] for r in info["imports"].values()) and info["cuda_available"]
    result.write_text(json.dumps(info, indent=2))
    print(RESULT_TAG + json.dumps({k: info.get(k) for k in ("gpus", "driver", "cuda", "versions", "free_gib", "ok")}))
    return 0 if info["ok"] else 1


def train_worker(result: Path, train_args: list[str]) -> int:
    """Subprocess body: launch/train.py's main in this process (`python launch/train.py` semantics: one rank),
    then the run's peak GPU memory, which the trainer does not log."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("mip_train", REPO / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    t0 = time.perf_counter()
    rc = module.main(train_args)
    res: dict[str, Any] = {"returncode": rc, "seconds": time.perf_counter() - t0}
    if torch.cuda.is_available():
        res.update(gpu=torch.cuda.get_device_name(), peak_alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(res, indent=2))
    print(RESULT_TAG + json.dumps(res), flush=True)
    return rc


# ----------------------------------------------------------------------------------------------- entry point
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line; what follows `--` is launch/train.py's (the hidden --train-worker mode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--install", type=Path, default=None, metavar="WHEELDIR",
                   help="first pip-install these wheels and this checkout offline into --site")
    p.add_argument("--site", type=Path, default=DEFAULT_SITE, help="where --install puts packages (on PYTHONPATH)")
    p.add_argument("--report", type=Path, default=None,
                   help="folder for the small report files (default WORKDIR/report)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="training runs, data and full logs")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="SECTION", help="run only these sections")
    p.add_argument("--loss-rtol", type=float, default=0.05, help="bf16 loss agreement: relative tolerance per step")
    p.add_argument("--loss-atol", type=float, default=0.02, help="bf16 loss agreement: absolute tolerance per step")
    p.add_argument("--preflight-worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--train-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.train_args = train_args
    return args


def cuda_gpus() -> int:
    """CUDA GPUs torch sees (0 without CUDA or without torch)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Install if asked (before any project import), then print the plan and run it where there is CUDA."""
    t_main = time.monotonic()
    args = parse_args(argv)
    if args.preflight_worker:
        return preflight_worker(args.preflight_worker)
    if args.train_worker:
        return train_worker(args.train_worker, args.train_args)
    installed: dict[str, Any] = {}
    if args.install is not None:
        installed = install(args.install, args.site.resolve())
        print_install(installed)
    workdir = args.workdir.resolve()
    ctx = Context(workdir=workdir, report=(args.report or workdir / "report").resolve(), loss_rtol=args.loss_rtol,
                  loss_atol=args.loss_atol, install=installed)
    plan = build_plan(ctx)
    if args.only:
        unknown = set(args.only) - {s.name for s in plan}
        if unknown:
            print(f"error: --only: no section {', '.join(sorted(unknown))}; sections: "
                  f"{', '.join(s.name for s in plan)}", file=sys.stderr)
            return 2
        plan = [s for s in plan if s.name in args.only]
    print_plan(plan, ctx, args.install is not None)
    if args.dry_run:
        print("dry run: nothing run")
        return 0
    if cuda_gpus() == 0:
        print("no GPU: nothing run")
        return 0
    command = "python3 launch/gpu_check.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    # the sections' clock starts after the install's budget: install, plan and all stay within TOTAL_BUDGET_S
    report = run_plan(plan, ctx, command.strip(), start=t_main + (INSTALL_BUDGET_S if args.install else 0))
    print()
    print(render_markdown(report))
    print(f"report: {ctx.report} (gpu_check.json, gpu_check.md, tails.log, ...); runs and logs: {ctx.workdir}")
    print("all sections passed" if report["ok"] else f"FAILED: {', '.join(report['failed'])}")
    return exit_code(report["sections"])


if __name__ == "__main__":
    sys.exit(main())
