"""Train MIP: `python launch/train.py --config C [key=value ...]`, or under `deepspeed` / `accelerate launch`.

Without --config: the embedded demo (configs/demo.yaml), continuing an unfinished demo run. Steps: parse; validate
without side effects (a bad config fails before any process group); make the synthetic data if the run uses it (the
demo); train (nccl on GPUs, gloo on CPUs); report. Errors: one `error:` line naming the file, key or value, exit
code 2 (3 when training diverged); the traceback with --debug or MIP_DEBUG=1.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from mip_dist.cli import debug_requested, report_error
from mip_dist.config import Config, ConfigError, load_config
from mip_dist.demo.ablation import AblationError, run_ablation
from mip_dist.demo.prepare import check_synthetic_targets, needs_synthetic_data, prepare_synthetic
from mip_dist.demo.resume import unfinished_demo_run
from mip_dist.engine.checkpoint import CheckpointError, CheckpointWriteError
from mip_dist.engine.distributed import CollectiveTimeoutError, LaunchEnvError, init_distributed, shutdown, slurm_env
from mip_dist.engine.run_checks import check_data_for_run, check_run_inputs, resolve_dataset
from mip_dist.engine.run_dir import release_run_dirs
from mip_dist.engine.trainer import RunDirError, Trainer, TrainingDiverged
from mip_dist.eval.report import format_table

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
ABLATION_CONFIG = DEMO_CONFIG.with_name("demo_ablation.yaml")
EXIT_DIVERGED, EXIT_SIGTERM = 3, 143
KNOWN_IN_RUN = (RunDirError, CheckpointError, CheckpointWriteError, CollectiveTimeoutError, ConfigError)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """--config, --resume, --ablation, --debug, the launcher's --local_rank and key=value overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help=f"YAML run config (default: configs/{DEMO_CONFIG.name}, the demo)")
    p.add_argument("--resume", metavar="auto|PATH", help="auto: the run's newest finished checkpoint, if any; "
                   "PATH: a checkpoint tag or run dir")
    p.add_argument("--allow-config-change", nargs="+", action="extend", default=[], metavar="KEY",
                   help="with --resume: keys whose saved value may change (train.epochs, optim.*, model dropouts)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--ablation", action="store_true", help="train the baseline ViT, then MIP, and print both "
                   f"(default config: configs/{ABLATION_CONFIG.name})")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=0.02")
    args = p.parse_intermixed_args(argv)  # overrides may follow --resume
    args.overrides += [k for k in args.allow_config_change if "=" in k]  # `--allow-config-change K k=v`: an override
    args.allow_config_change = tuple(k for k in args.allow_config_change if "=" not in k)
    return args


def preflight(cfg: Config, world_size: int, resume: str | None, allow_changes: tuple[str, ...] = ()) -> None:
    """Checks without side effects or a process group (every rank, before any can create the run directory);
    the demo's synthetic set is only checked here: prepare() makes it."""
    if allow_changes and not resume:
        raise ConfigError(f"--allow-config-change {' '.join(allow_changes)}: only applies with --resume")
    synthetic = needs_synthetic_data(cfg.data)
    if synthetic:
        check_synthetic_targets(cfg.data)
    check_run_inputs(cfg, world_size, resume, data=not synthetic, allow_changes=allow_changes)


def prepare(cfg: Config, world_size: int) -> None:
    """The demo's only write before training: the synthetic set and its shards, made or reused, then checked."""
    if needs_synthetic_data(cfg.data):
        prepare_synthetic(cfg.data, world_size)
        check_data_for_run(cfg)


def train(cfg: Config, args: argparse.Namespace, debug: bool) -> dict:
    """The Trainer in a process group; an error exits at once (teardown with live gloo threads can hide the code)."""
    env = init_distributed(cfg.train.device, args.local_rank, cfg.train.collective_timeout_s)
    try:
        summary = Trainer(cfg, env, resume=args.resume, allow_config_change=args.allow_config_change).fit()
    except KNOWN_IN_RUN as exc:  # one line, not a traceback
        code = report_error(exc, debug, known=KNOWN_IN_RUN)
    except TrainingDiverged as exc:  # agreed by every rank
        print(f"error: training diverged: {exc}", file=sys.stderr)
        code = EXIT_DIVERGED
    except Exception as exc:  # noqa: BLE001 - inside the process group: one line per rank, then exit now
        code = report_error(exc, debug, prefix=f"rank {env.rank}: ")
    else:
        shutdown()
        return summary
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    release_run_dirs()  # os._exit skips atexit: leave no stale run.lock behind
    os._exit(code)


def report(summary: dict) -> None:
    """How the run ended and its final evaluation table, if it wrote one (printed by rank 0)."""
    results = Path(summary["run_dir"]) / "results.json"
    print(f"{summary['status']}: step {summary['step']}, run directory {summary['run_dir']}")
    if results.is_file():
        print(format_table(json.loads(results.read_text())["results"]))
        print(f"results: {results}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, validate, prepare, train, report; returns the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:  # plain `srun`: RANK, WORLD_SIZE, ... from SLURM's variables before anything reads them
        os.environ.update(slurm_env())
    except LaunchEnvError as exc:
        return report_error(exc, debug_requested(args.debug), known=(LaunchEnvError,))
    debug, rank, world_size = debug_requested(args.debug), int(os.getenv("RANK", "0")), int(os.getenv("WORLD_SIZE", 1))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    path = Path(args.config) if args.config else ABLATION_CONFIG if args.ablation else DEMO_CONFIG
    try:
        if args.ablation:
            print(run_ablation([sys.executable, __file__], str(path), args.overrides))
            return 0
        cfg = resolve_dataset(load_config(path, args.overrides))  # data.dataset auto: from index.json
        if args.config is None and args.resume is None:  # the demo: never overwrite, continue if cut off
            args.resume = unfinished_demo_run(cfg.train.output_dir)
        preflight(cfg, world_size, args.resume, args.allow_config_change)
        prepare(cfg, world_size)
    except AblationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except Exception as exc:  # noqa: BLE001 - before any process group: one line, exit 2
        return report_error(exc, debug, known=(ConfigError,), prefix=f"{path}: ")
    summary = train(cfg, args, debug)
    if rank == 0:
        report(summary)
    return EXIT_SIGTERM if summary["status"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
