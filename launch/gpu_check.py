"""One command that checks a GPU machine end to end and writes a README-ready table.

On a machine with NVIDIA GPUs (about 5-8 minutes on one H100/H200; an overall budget, default 480 s,
caps every section's timeout so the whole run never takes longer):

  env                    GPU name(s), driver, torch, Triton, CUDA and DeepSpeed versions
  kernel-tests           pytest on the four kernel test files, compiled (TRITON_INTERPRET unset)
  bench-attention        launch/bench_attention.py at its default shapes: the paper block calls (B 64/128,
                         N 129/211) and the IPG call (16 broadcast queries, 210 keys, one-entry bank)
  model-{triton,torch,concat}
                         ViT-B/16 MIP (configs/mip_vitb16_sysu.yaml) forward+backward, bf16, batch 64:
                         img/s and peak GPU memory (a subprocess of this script, reusing bench_model.py)
  deepspeed-{1,2}gpu-zero{0,3}
                         50-step `deepspeed` run of configs/tiny.yaml on synthetic data over NCCL, bf16
                         (2-GPU runs only when there are 2 GPUs)
  loss-agreement-{1,2}gpu
                         per-step losses of the ZeRO-3 run vs the ZeRO-0 run (bf16 tolerance, see --loss-rtol)

Every section runs as a subprocess with its own timeout; a failing section is recorded and the others
still run. Results go to runs/gpu_check/<timestamp>/gpu_check.json (--out) and a Markdown table to
gpu_check.md beside it; logs of every section to logs/ there. Exit status 1 if any check failed.
Without CUDA (or with --dry-run) it prints the plan, one line per check with its command, and exits 0.

    python launch/gpu_check.py
    python launch/gpu_check.py --dry-run
    python launch/gpu_check.py --out runs/gpu_check/h200/gpu_check.json --only kernel-tests model
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mip_dist.engine.distributed import free_port  # a free rendezvous port per launcher run

REPO = Path(__file__).resolve().parent.parent

KERNEL_TESTS = ["tests/test_kernel_attention.py", "tests/test_kernel_dispatch.py", "tests/test_kernel_model.py",
                "tests/test_kernel_compile.py", "tests/test_gpu_path.py"]
PAPER_CONFIG = "configs/mip_vitb16_sysu.yaml"
TINY_CONFIG = "configs/tiny.yaml"
MODEL_IMPLS = ("triton", "torch", "concat")
ZERO_STAGES = (0, 3)
TRAIN_EPOCHS, TRAIN_STEPS_PER_EPOCH = 2, 25  # 50 steps
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader"]
PASS, FAIL, TIMEOUT, NOT_RUN, SKIPPED = "pass", "fail", "timeout", "not run", "skipped"
OK_STATUSES = (PASS, SKIPPED)  # skipped = needs more GPUs than the machine has: not a failure
RESULT_TAG = "GPU_CHECK_RESULT "


@dataclass
class Check:
    """One planned section: what it checks, how (a command, or a comparison of two runs) and its time limit."""

    name: str
    what: str
    kind: str  # env | pytest | bench | model | train | compare
    cmd: list[str] = field(default_factory=list)
    timeout_s: int = 60
    gpus: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- plan
def deepspeed_launcher() -> list[str]:
    """The `deepspeed` launcher script of this interpreter's environment, run by this interpreter."""
    script = Path(sys.executable).parent / "deepspeed"
    found = str(script) if script.is_file() else shutil.which("deepspeed")
    return [sys.executable, found or str(script)]


def train_overrides(workdir: Path, run_name: str, stage: int) -> list[str]:
    """configs/tiny.yaml made into a 50-step bf16 GPU run on a small synthetic set under `workdir`, one log per step."""
    return [f"train.zero_stage={stage}", "train.precision=bf16", "train.device=cuda",
            f"train.epochs={TRAIN_EPOCHS}", f"data.steps_per_epoch={TRAIN_STEPS_PER_EPOCH}", "train.log_every=1",
            "train.eval_every_epochs=0", "loss.msel_start_epoch=1", f"data.root={workdir / 'data' / 'synthetic'}",
            f"data.shards={workdir / 'data' / 'shards'}", "data.synthetic_ids=16", "data.synthetic_test_ids=4",
            "data.synthetic_images_per_camera=2", "data.workers=1", f"train.output_dir={workdir / 'train'}",
            f"train.run_name={run_name}"]


def build_plan(workdir: Path, args: argparse.Namespace) -> list[Check]:
    """Every check in run order, with its command and timeout (2-GPU runs included; skipped when absent)."""
    py, bench = sys.executable, str(REPO / "launch" / "bench_attention.py")
    me = str(Path(__file__).resolve())
    plan = [Check("env", "GPU name(s), driver, torch, Triton, CUDA, DeepSpeed versions", "env",
                  NVIDIA_SMI, 30),
            Check("kernel-tests", "kernel tests compiled on the GPU (TRITON_INTERPRET unset)", "pytest",
                  [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *KERNEL_TESTS], 180),
            Check("bench-attention", "fused attention vs concat+SDPA/Flex/torch at the paper block and IPG shapes",
                  "bench", [py, bench, "--out", str(workdir / "bench_attention.json")], 240)]
    for impl in MODEL_IMPLS:
        result = workdir / f"model_{impl}.json"
        plan.append(Check(f"model-{impl}", f"MIP ViT-B/16 fwd+bwd img/s + peak memory, impl {impl}, bf16, "
                                           f"batch {args.model_batch}", "model",
                          [py, me, "--model-worker", impl, "--model-batch", str(args.model_batch),
                           "--model-steps", str(args.model_steps), "--worker-result", str(result)],
                          120, extra={"result": str(result), "impl": impl}))
    for gpus in (1, 2):
        for stage in ZERO_STAGES:
            run_name = f"{gpus}gpu-zero{stage}"
            plan.append(Check(f"deepspeed-{run_name}", f"{TRAIN_EPOCHS * TRAIN_STEPS_PER_EPOCH}-step tiny deepspeed "
                                                       f"run, {gpus} GPU(s), NCCL, ZeRO {stage}, bf16", "train",
                              [*deepspeed_launcher(), "--num_gpus", str(gpus), "--master_port", str(free_port()),
                               str(REPO / "launch" / "train.py"), "--config", TINY_CONFIG,
                               *train_overrides(workdir, run_name, stage)],
                              150, gpus=gpus, extra={"run_dir": str(workdir / "train" / run_name)}))
        ref, other = f"deepspeed-{gpus}gpu-zero{ZERO_STAGES[0]}", f"deepspeed-{gpus}gpu-zero{ZERO_STAGES[-1]}"
        plan.append(Check(f"loss-agreement-{gpus}gpu", f"per-step loss of {other} vs {ref} (bf16: |d| <= "
                                                       f"{args.loss_atol:g} + {args.loss_rtol:g}*|ref|)", "compare",
                          [], 0, gpus=gpus, extra={"ref": ref, "other": other}))
    if args.only:
        plan = [c for c in plan if any(c.name.startswith(prefix) for prefix in args.only)]
    return plan


def describe(check: Check, n_gpus: Optional[int]) -> str:
    """One plan line: name, what, command (or comparison) and timeout; marks checks this machine cannot run."""
    if check.kind == "compare":
        how = f"compare {check.extra['other']}/metrics.jsonl losses with {check.extra['ref']}'s"
    elif check.kind == "env":
        how = "torch.cuda / triton / deepspeed versions in-process; " + shlex.join(check.cmd)
    else:
        how = shlex.join(check.cmd)
    note = ""
    if check.gpus > 1 and (n_gpus is None or n_gpus < check.gpus):
        note = f" [needs {check.gpus} GPUs{'' if n_gpus is None else f', {n_gpus} here: skipped'}]"
    limit = f" (timeout {check.timeout_s} s)" if check.timeout_s else ""
    return f"  {check.name}: {check.what}{note}{limit}\n      $ {how}"


def print_plan(plan: list[Check], n_gpus: Optional[int], budget_s: float) -> None:
    """The list of checks a GPU run performs, one per check with its command."""
    print(f"gpu_check plan: {len(plan)} checks, overall budget {budget_s:.0f} s, run from {REPO}")
    for check in plan:
        print(describe(check, n_gpus))


# ----------------------------------------------------------------------------------------------- pure helpers
def parse_pytest_counts(text: str) -> dict[str, int]:
    """Counts from pytest's final summary line ('2 failed, 40 passed, 1 skipped in 3.2s'); {} if none."""
    import re

    for line in reversed(text.strip().splitlines()):
        if re.search(r"\bin [\d.]+s\b", line) and re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            counts: dict[str, int] = {}
            for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected)", line):
                key = "errors" if word.startswith("error") else word
                counts[key] = counts.get(key, 0) + int(n)
            return counts
    return {}


def train_records(metrics_path: Path) -> list[dict]:
    """The training records of a run's metrics.jsonl, in order."""
    return [r for r in map(json.loads, metrics_path.read_text().splitlines()) if r.get("kind") == "train"]


def losses_of(train: list[dict]) -> dict[int, float]:
    """Step -> logged training loss of a run's training records."""
    return {int(r["step"]): float(r["loss"]) for r in train if "loss" in r}


def read_losses(metrics_path: Path) -> dict[int, float]:
    """Step -> logged training loss from a run's metrics.jsonl."""
    return losses_of(train_records(metrics_path))


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


def exit_code(results: list[dict]) -> int:
    """1 if any check did not pass (skipped for want of GPUs is fine), else 0."""
    return int(any(r["status"] not in OK_STATUSES for r in results))


def _fmt(value: Any, spec: str, missing: str = "–") -> str:
    """A table cell: formatted number, or a dash where the check produced none."""
    return missing if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """The README table: one row per check, then attention ratios, model throughput and the DeepSpeed runs."""
    env = report.get("env", {})
    gpus = env.get("gpus") or ["no GPU"]
    names = ", ".join(sorted(set(gpus)))
    lines = [f"### GPU check: {len(gpus)} x {names} ({report.get('date', '')[:10]})", "",
             f"driver {env.get('driver', '?')}, CUDA {env.get('cuda', '?')}, torch {env.get('torch', '?')}, "
             f"Triton {env.get('triton', '?')}, DeepSpeed {env.get('deepspeed', '?')}; "
             f"`python launch/gpu_check.py` ({report.get('seconds', 0):.0f} s)", "",
             "| check | status | time | result |", "|---|---|---|---|"]
    results = report.get("checks", [])
    for r in results:
        lines.append(f"| {r['name']} | {r['status']} | {r.get('seconds', 0):.0f} s | {r.get('summary', '')} |")
    benches = [r for r in results if r.get("ratios")]
    if benches:
        impls = sorted({k for r in benches for row in r["ratios"] for k in row["ratios"]})
        lines += ["", "Fused prompt attention: time of each implementation / fused-triton's (same shape and mode; "
                  ">1 = fused faster)", "",
                  "| shape | mode | fused-triton ms | " + " | ".join(impls) + " |",
                  "|---|---|---|" + "---|" * len(impls)]
        for r in benches:
            for row in r["ratios"]:
                cells = [_fmt(row["ratios"].get(i), ".2f") for i in impls]
                lines.append(f"| {row['case']} B{row['B']} N{row['N']} L{row['L']} | {row['mode']} | "
                             f"{_fmt(row['fused_ms'], '.3f')} | " + " | ".join(cells) + " |")
        for r in benches:
            if r.get("note"):
                lines += ["", f"{r['name']}: {r['note']}."]
    models = [r for r in results if r.get("kind") == "model" and r.get("img_s") is not None]
    if models:
        lines += ["", f"MIP ViT-B/16 256x128 forward+backward ({PAPER_CONFIG}, bf16, batch "
                      f"{models[0].get('batch', '?')})", "",
                  "| attention impl | img/s | ms/step | peak allocated GiB | peak reserved GiB |",
                  "|---|---|---|---|---|"]
        for r in models:
            lines.append(f"| {r['impl']} | {r['img_s']:.0f} | {r['step_ms']:.1f} | {r['peak_alloc_gib']:.2f} | "
                         f"{r['peak_reserved_gib']:.2f} |")
    runs = [r for r in results if r.get("kind") == "train" and r["status"] != SKIPPED]
    if runs:
        agree = {r["other"]: r for r in results if r.get("kind") == "compare" and "other" in r}
        lines += ["", f"Tiny `deepspeed` runs ({TINY_CONFIG}, synthetic data, NCCL, bf16, "
                      f"{TRAIN_EPOCHS * TRAIN_STEPS_PER_EPOCH} steps): ZeRO-3 losses vs ZeRO-0's, per logged step", "",
                  "| run | status | first loss | last loss | img/s (last step) | max abs diff vs ZeRO 0 | within tol |",
                  "|---|---|---|---|---|---|---|"]
        for r in runs:
            cmp = agree.get(r["name"], {})
            lines.append(f"| {r['name']} | {r['status']} | {_fmt(r.get('first_loss'), '.4f')} | "
                         f"{_fmt(r.get('last_loss'), '.4f')} | {_fmt(r.get('img_s'), '.0f')} | "
                         f"{_fmt(cmp.get('max_abs_diff'), '.2e')} | "
                         f"{'yes' if cmp.get('status') == PASS else ('no' if cmp else '–')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- running
def child_env() -> dict[str, str]:
    """This environment without TRITON_INTERPRET (compiled kernels), unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_command(cmd: list[str], timeout_s: float, log_path: Path) -> tuple[Optional[int], float]:
    """Run `cmd` from the repo root into `log_path`; kill its whole process group on timeout (returns None)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "w") as fh:
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as exc:
            fh.write(f"could not start: {exc}\n")
            return 127, time.monotonic() - t0
        try:
            rc: Optional[int] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        try:  # a timed-out launcher and every rank it started, or a finished one's leftovers (a stuck rank)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if rc is None:
            proc.wait()
    return rc, time.monotonic() - t0


def tail(text: str, n: int = 3000) -> str:
    """The end of a section's output: where its error is, small enough for the JSON."""
    return text[-n:]


def env_info() -> dict[str, Any]:
    """Versions and GPUs of this machine (nvidia-smi for the driver; torch does not report it)."""
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "gpus": [], "driver": None}
    for mod in ("triton", "deepspeed"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001 - a missing/broken package is a result, not a crash
            info[mod] = f"unavailable ({type(exc).__name__})"
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        smi = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip().splitlines()
        drivers = {line.split(",")[2].strip() for line in info["nvidia_smi"] if line.count(",") >= 3}
        info["driver"] = ", ".join(sorted(drivers)) or None
    except (OSError, subprocess.TimeoutExpired) as exc:
        info["nvidia_smi"] = f"unavailable ({type(exc).__name__})"
    return info


def summarize(check: Check, rc: Optional[int], text: str, results: dict[str, dict]) -> dict[str, Any]:
    """Status and parsed numbers of one finished section (from its exit code, output and files)."""
    out: dict[str, Any] = {"returncode": rc}
    ok = rc == 0
    if check.kind == "pytest":
        counts = parse_pytest_counts(text)
        out["counts"] = counts
        ok = ok and counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("errors")
        out["summary"] = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no pytest summary"
    elif check.kind == "bench":
        path = Path(check.cmd[check.cmd.index("--out") + 1])
        rows = json.loads(path.read_text()).get("rows", []) if path.is_file() else []  # CPU smoke: no rows
        out["ratios"] = bench_ratios(rows)
        out["note"] = check.extra.get("note")
        fused = [r for r in out["ratios"] if r["fused_ms"] is not None]
        ok = ok and bool(fused) and len(fused) == len(out["ratios"])
        best = [f"{r['mode']} B{r['B']} N{r['N']}: {r['fused_ms']:.3f} ms" for r in fused if r["mode"] == "fwd+bwd"]
        out["summary"] = "fused-triton " + "; ".join(best) if best else "no fused-triton timings"
    elif check.kind == "model":
        path = Path(check.extra["result"])
        if path.is_file():
            out.update(json.loads(path.read_text()))
            out["summary"] = f"{out['img_s']:.0f} img/s, peak {out['peak_alloc_gib']:.2f} GiB allocated"
        else:
            ok, out["summary"] = False, "no result written"
        out["impl"] = check.extra["impl"]
    elif check.kind == "train":
        metrics = Path(check.extra["run_dir"]) / "metrics.jsonl"
        train = train_records(metrics) if metrics.is_file() else []
        losses = losses_of(train)
        steps = TRAIN_EPOCHS * TRAIN_STEPS_PER_EPOCH
        out.update(losses=losses, steps=len(losses), nccl="backend nccl" in text, run_dir=check.extra["run_dir"])
        if losses:
            out.update(first_loss=losses[min(losses)], last_loss=losses[max(losses)], img_s=train[-1].get("img_s"))
        ok = ok and out["nccl"] and len(losses) == steps and all(math.isfinite(v) for v in losses.values())
        out["summary"] = (f"{len(losses)}/{steps} steps, loss {out['first_loss']:.4f} -> {out['last_loss']:.4f}"
                          if losses else f"0/{steps} steps logged") + ("" if out["nccl"] else ", NCCL not seen in log")
    out["status"] = PASS if ok else (TIMEOUT if rc is None else FAIL)
    if rc is None:
        out["summary"] = f"timed out after {check.timeout_s} s; " + out.get("summary", "")
    return out


def run_compare(check: Check, results: dict[str, dict], rtol: float, atol: float) -> dict[str, Any]:
    """Loss agreement of two finished training runs (fails if either did not finish)."""
    ref, other = results.get(check.extra["ref"], {}), results.get(check.extra["other"], {})
    out: dict[str, Any] = {"ref": check.extra["ref"], "other": check.extra["other"]}
    if ref.get("status") != PASS or other.get("status") != PASS:
        out.update(status=FAIL, summary=f"needs both runs to pass ({ref.get('status')}, {other.get('status')})")
        return out
    cmp = compare_losses(ref["losses"], other["losses"], rtol, atol)
    out.update(cmp, status=PASS if cmp["ok"] else FAIL)
    out["summary"] = (f"{cmp['steps']} steps, max |d| {cmp['max_abs_diff']:.2e} (rel {cmp['max_rel_diff']:.2e}), "
                      f"tol {atol:g} + {rtol:g}*|ref|" if "max_abs_diff" in cmp else "") + \
        (f"; {cmp['reason']}" if "reason" in cmp else "")
    return out


def run_check(check: Check, workdir: Path, n_gpus: int, deadline: float, results: dict[str, dict],
              args: argparse.Namespace) -> dict[str, Any]:
    """Run one section within its timeout and what is left of the overall budget; never raises."""
    base = {"name": check.name, "what": check.what, "kind": check.kind, "cmd": shlex.join(check.cmd),
            "timeout_s": check.timeout_s}
    if check.gpus > n_gpus:
        return {**base, "status": SKIPPED, "seconds": 0.0, "summary": f"needs {check.gpus} GPUs, {n_gpus} here"}
    if check.kind == "compare":
        return {**base, "seconds": 0.0, **run_compare(check, results, args.loss_rtol, args.loss_atol)}
    left = deadline - time.monotonic()
    if left < 10:
        return {**base, "status": NOT_RUN, "seconds": 0.0, "summary": "overall time budget spent"}
    t0 = time.monotonic()
    try:
        if check.kind == "env":
            info = env_info()
            ok = info["cuda_available"] and bool(info["gpus"])
            return {**base, "status": PASS if ok else FAIL, "seconds": time.monotonic() - t0, "env": info,
                    "summary": f"{len(info['gpus'])} x {', '.join(sorted(set(info['gpus'])))}; driver {info['driver']}"}
        if check.kind == "train":
            shutil.rmtree(check.extra["run_dir"], ignore_errors=True)  # a rerun into the same --out starts afresh
        log_path = workdir / "logs" / f"{check.name}.log"
        rc, seconds = run_command(check.cmd, min(check.timeout_s, left), log_path)
        text = log_path.read_text(errors="replace")
        res = {**base, "seconds": seconds, "log": str(log_path), **summarize(check, rc, text, results)}
        if res["status"] != PASS:
            res["output_tail"] = tail(text)
        return res
    except Exception as exc:  # noqa: BLE001 - recorded; the remaining sections still run
        return {**base, "status": FAIL, "seconds": time.monotonic() - t0, "summary": f"{type(exc).__name__}: {exc}"}


def write_report(report: dict[str, Any], out: Path) -> None:
    """gpu_check.json and gpu_check.md beside it (rewritten after every section)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    out.with_name("gpu_check.md").write_text(render_markdown(report))


def run_all(plan: list[Check], args: argparse.Namespace, n_gpus: int) -> int:
    """Every check in order, the report rewritten after each (a killed run keeps what it had); exit code."""
    out = args.out.resolve()
    workdir = out.parent
    t_start, deadline = time.monotonic(), time.monotonic() + args.budget_s
    report: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "repo": str(REPO),
                              "budget_s": args.budget_s, "checks": [],
                              "loss_tolerance": {"rtol": args.loss_rtol, "atol": args.loss_atol}}
    by_name: dict[str, dict] = {}
    for i, check in enumerate(plan, 1):
        print(f"== [{i}/{len(plan)}] {check.name}: {check.what}", flush=True)
        res = run_check(check, workdir, n_gpus, deadline, by_name, args)
        by_name[check.name] = res
        report["checks"].append(res)
        if check.kind == "env" and "env" in res:
            report["env"] = res["env"]
            print(f"   GPUs: {res['env']['gpus']}; driver {res['env']['driver']}; torch {res['env']['torch']}; "
                  f"CUDA {res['env']['cuda']}; Triton {res['env']['triton']}; DeepSpeed {res['env']['deepspeed']}")
        print(f"   {res['status']} ({res.get('seconds', 0):.0f} s): {res.get('summary', '')}", flush=True)
        report["seconds"] = time.monotonic() - t_start
        write_report(report, out)
    if "env" not in report:
        report["env"] = env_info()
    report["failed"] = [r["name"] for r in report["checks"] if r["status"] not in OK_STATUSES]
    report["ok"] = not report["failed"]
    report["seconds"] = time.monotonic() - t_start
    write_report(report, out)
    print()
    print(render_markdown(report))
    print(f"wrote {out} and {out.with_name('gpu_check.md')}")
    print("all checks passed" if report["ok"] else f"FAILED: {', '.join(report['failed'])}")
    return exit_code(report["checks"])


# ----------------------------------------------------------------------------------------------- model worker
def _bench_model() -> Any:
    """launch/bench_model.py loaded by its path (a script beside this one, not an installed module)."""
    spec = importlib.util.spec_from_file_location("bench_model", Path(__file__).with_name("bench_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_worker(impl: str, batch: int, steps: int, warmup: int, result: Path) -> int:
    """Subprocess body: bf16 forward+backward img/s and peak memory of the paper MIP with one attention impl."""
    import torch

    from mip_dist.config import load_config
    from mip_dist.losses import MIPLoss
    from mip_dist.model import build_model

    cfg = load_config(REPO / PAPER_CONFIG, ["model.pretrained="])  # random init: never downloads weights
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, num_classes=395, num_cameras=6)
    model = model.to(device=device, dtype=torch.bfloat16).train()  # DeepSpeed bf16 trains bf16 weights too
    model.attention_impl = impl
    criterion = MIPLoss(cfg.loss)
    images = torch.randn(batch, 3, *cfg.model.img_size, device=device, dtype=torch.bfloat16)
    modality, camera = torch.arange(batch, device=device) % 2, torch.arange(batch, device=device) % 6
    pids = torch.arange(batch, device=device) // 4

    def step() -> None:
        """One training step's compute, as bench_model.py times it (loss with MSEL on)."""
        model.zero_grad(set_to_none=True)
        loss, _ = criterion(model(images, modality, camera), pids, modality, epoch=1000)
        loss.backward()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    gflop = _bench_model().analytic_gflops(cfg.model, impl, batch)
    res = {"impl": impl, "batch": batch, "steps": steps, "step_ms": seconds * 1e3, "img_s": batch / seconds,
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
           "gflop_per_img_fwd": gflop, "approx_tflops_fwd_bwd": 3 * gflop * batch / seconds / 1e3,
           "gpu": torch.cuda.get_device_name()}
    result.write_text(json.dumps(res, indent=2))
    print(RESULT_TAG + json.dumps(res), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- entry point
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line: output path, dry run, subset, budget, loss tolerance (and the hidden model-worker mode)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON report path (default runs/gpu_check/<timestamp>/gpu_check.json); gpu_check.md, "
                        "logs/, bench JSON and training runs go beside it")
    p.add_argument("--dry-run", action="store_true", help="print the checks and their commands, run nothing")
    p.add_argument("--only", nargs="+", default=None, metavar="PREFIX",
                   help="run only checks whose name starts with one of these (e.g. kernel-tests model deepspeed-1gpu)")
    p.add_argument("--budget-s", type=float, default=480.0, help="overall time limit; caps every section's timeout")
    p.add_argument("--loss-rtol", type=float, default=0.05, help="bf16 loss agreement: relative tolerance per step")
    p.add_argument("--loss-atol", type=float, default=0.02, help="bf16 loss agreement: absolute tolerance per step")
    p.add_argument("--model-batch", type=int, default=64, help="batch of the model throughput check")
    p.add_argument("--model-steps", type=int, default=10, help="timed steps of the model throughput check")
    p.add_argument("--model-warmup", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--model-worker", choices=MODEL_IMPLS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def cuda_gpus() -> int:
    """Number of CUDA GPUs torch sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: Optional[list[str]] = None) -> int:
    """Plan, then either list it (dry run / no CUDA) or run it; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.model_worker:
        return model_worker(args.model_worker, args.model_batch, args.model_steps, args.model_warmup,
                            args.worker_result)
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = REPO / "runs" / "gpu_check" / stamp / "gpu_check.json"
    plan = build_plan(args.out.resolve().parent, args)
    n_gpus = cuda_gpus()
    if args.dry_run or n_gpus == 0:
        print_plan(plan, n_gpus if n_gpus else None, args.budget_s)
        print("no GPU: nothing run" if n_gpus == 0 else "dry run: nothing run")
        return 0
    print_plan(plan, n_gpus, args.budget_s)
    return run_all(plan, args, n_gpus)


if __name__ == "__main__":
    sys.exit(main())
