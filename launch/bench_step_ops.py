"""Host work per training step, side by side: ATen ops dispatched and host syncs of one real Trainer step.

A fast GPU finishes a ViT-B step in about 25 ms; a step whose Python issues thousands of small ops, or waits
for the device before every gradient's overflow check, keeps it idle. Both are measured here on the CPU, op
by op (mip_dist.engine.op_counter), phase by phase (forward + loss, backward, gradient norm + optimizer), for
the precisions and ZeRO stages the trainer runs, each in its own process on the same synthetic shards:

  bf16 ZeRO-0, DeepSpeed stage 0   what the trainer asked DeepSpeed for before: FP16_UnfusedOptimizer
  bf16 ZeRO-0                      what it asks for now: stage 1 + fp32 gradient accumulation (BF16_Optimizer)
  bf16 ZeRO-1                      the same wrapper
  fp32 ZeRO-0                      no wrapper; the trainer clips with one foreach norm

    python launch/bench_step_ops.py                          # the paper config (ViT-B/16, 256x128), batch 4
    python launch/bench_step_ops.py --config configs/tiny.yaml --batch 8
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, tuple[list[str], bool]] = {  # name -> (overrides, force DeepSpeed stage 0)
    "bf16 ZeRO-0, DeepSpeed stage 0 (before)": (["train.precision=bf16", "train.zero_stage=0"], True),
    "bf16 ZeRO-0": (["train.precision=bf16", "train.zero_stage=0"], False),
    "bf16 ZeRO-1": (["train.precision=bf16", "train.zero_stage=1"], False),
    "fp32 ZeRO-0": (["train.precision=fp32", "train.zero_stage=0"], False),
}
PHASES = ("forward+loss", "backward", "optimizer")


def _bench_train() -> Any:
    """launch/bench_train.py by path, for its synthetic-data helper (a script beside this one)."""
    spec = importlib.util.spec_from_file_location("bench_train", Path(__file__).with_name("bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stage0_json(overrides: list[str], config: str, folder: Path) -> str:
    """A train.deepspeed_config that asks DeepSpeed for stage 0 in bf16 (the wrapper used before)."""
    from mip_dist.config import load_config
    from mip_dist.engine.ds_config import build_ds_config

    ds = build_ds_config(load_config(REPO / config, overrides), 1)
    ds["zero_optimization"] = {"stage": 0}
    ds["data_types"] = {"buffer_dtype": "bf16"}
    path = folder / "deepspeed_stage0_bf16.json"
    path.write_text(json.dumps(ds))
    return str(path)


def worker(config: str, overrides: list[str], steps: int) -> dict[str, Any]:
    """In this process: a Trainer, `steps` training steps, the last one counted phase by phase."""
    from mip_dist.config import load_config
    from mip_dist.engine.distributed import init_distributed, shutdown
    from mip_dist.engine.metrics_log import StepTimer
    from mip_dist.engine.op_counter import SyncCounter
    from mip_dist.engine.trainer import Trainer

    trainer = Trainer(load_config(REPO / config, overrides), init_distributed("cpu"))
    trainer.timer, trainer.window = StepTimer(), {}
    counts = {p: [0, 0] for p in PHASES}  # phase -> [ops dispatched, host syncs]
    phase = ["forward+loss"]
    counter: SyncCounter | None = None

    def switch(name: str) -> None:
        """Book what the counter saw to the phase that just ended."""
        if counter is not None:
            counts[phase[0]][0] += counter.dispatched
            counts[phase[0]][1] += counter.count
            counter.dispatched, counter.ops = 0, []
        phase[0] = name

    backward, step = trainer.engine.backward, trainer.engine.step
    trainer.engine.backward = lambda loss: (switch("backward"), backward(loss))[1]
    trainer.engine.step = lambda: (switch("optimizer"), step())[1]
    batches = iter(trainer.stream)
    for i in range(steps):
        batch = next(batches)
        trainer.micro_in_epoch += 1
        if i < steps - 1:
            trainer._train_step(batch, 0.0)
            continue
        phase[0] = "forward+loss"
        with SyncCounter() as counter:
            trainer._train_step(batch, 0.0)
            switch("forward+loss")
    wrapper = type(trainer.engine.optimizer).__name__
    shutdown(wait=False)
    return {"wrapper": wrapper, "ops": {p: c[0] for p, c in counts.items()},
            "syncs": {p: c[1] for p, c in counts.items()}}


def run_variant(name: str, args: argparse.Namespace, data: list[str], work: Path) -> dict[str, Any]:
    """One variant in its own process (a fresh DeepSpeed engine and process group)."""
    overrides, force_stage0 = VARIANTS[name]
    runs = Path(tempfile.mkdtemp(prefix="runs_", dir=work))  # a fresh run folder: never resumes an earlier one
    ov = data + overrides + [f"train.output_dir={runs}", "train.run_name=ops",
                             "model.pretrained=", "train.device=cpu", "train.eval_every_epochs=0",
                             "data.workers=0", f"data.batch_size={args.batch}",
                             f"data.num_instances={max(1, args.batch // 4)}", *args.overrides]
    if force_stage0:
        ov.append(f"train.deepspeed_config={stage0_json(ov, args.config, runs)}")
    cmd = [sys.executable, __file__, "--worker", json.dumps(ov), "--config", args.config, "--steps", str(args.steps)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name}: the worker failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def print_table(results: dict[str, dict[str, Any]]) -> None:
    """One row per variant: wrapper, ops per phase, host syncs, total ops relative to the first row."""
    base = sum(next(iter(results.values()))["ops"].values())
    print("| variant | DeepSpeed optimizer | " + " | ".join(f"{p} ops" for p in PHASES)
          + " | host syncs (fwd/bwd/opt) | ops vs first row |")
    print("|---|---|" + "---|" * len(PHASES) + "---|---|")
    for name, r in results.items():
        total = sum(r["ops"].values())
        syncs = "/".join(str(r["syncs"][p]) for p in PHASES)
        print(f"| {name} | {r['wrapper']} | " + " | ".join(f"{r['ops'][p]:,}" for p in PHASES)
              + f" | {syncs} | {total / base:.2f} |")


def main() -> int:
    """Parse, make the synthetic shards once, run every variant, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mip_vitb16_sysu.yaml")
    p.add_argument("--batch", type=int, default=4, help="images per step (2 identities x 2 modalities at 4)")
    p.add_argument("--steps", type=int, default=2, help="steps per variant; the last is counted")
    p.add_argument("--work", type=Path, default=None, help="folder for the synthetic set and runs (default: temp)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="extra config overrides for every variant")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.config, json.loads(args.worker), args.steps)))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_step_ops_"))
    data = _bench_train().synthetic_data(args.config, work, "ops", ids=8, per_camera=2,
                                         extra=["model.pretrained="])
    print(f"{args.config}, batch {args.batch}, step {args.steps} of each variant counted, on this CPU")
    results = {}
    for name in VARIANTS:
        results[name] = run_variant(name, args, data, work)
        print(f"  {name}: {sum(results[name]['ops'].values()):,} ops, "
              f"{sum(results[name]['syncs'].values())} host syncs", flush=True)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
