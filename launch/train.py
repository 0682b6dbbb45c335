"""Train MIP: `python launch/train.py --config C [key=value ...]`, or under `deepspeed` / `accelerate launch`.

Parses arguments, builds and checks the config (a bad config fails here, before any process group
starts), initialises the process group (nccl on GPUs, gloo on CPUs) and hands over to the Trainer.
Errors: one `error:` line naming the file, key or value, exit code 2 (3 when training diverged);
the traceback only with --debug or MIP_DEBUG=1.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
EXIT_CONFIG, EXIT_DIVERGED, EXIT_SIGTERM = 2, 3, 143


def parse_args(argv: list[str]) -> argparse.Namespace:
    """--config, --resume, the launcher's --local_rank, and key=value overrides."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"YAML run config (default: {DEMO_CONFIG.relative_to(REPO)}, the embedded demo)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="auto: newest finished checkpoint of the run (if any); PATH: a checkpoint tag or run dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--ablation", action="store_true",
                   help="train the baseline ViT and MIP on the same data (default config: configs/demo_ablation.yaml) "
                        "one after the other and print their results side by side")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=0.02")
    return p.parse_args(argv)


def config_path(arg: str | None) -> Path:
    """The --config file, or the demo config when none is given."""
    # Demo hook: `python launch/train.py` with no arguments trains configs/demo.yaml.
    from mip_dist.config import ConfigError

    if arg is not None:
        return Path(arg)
    if DEMO_CONFIG.is_file():
        return DEMO_CONFIG
    raise ConfigError(f"no --config given and the demo config {DEMO_CONFIG} does not exist")


def setup_logging(rank: int) -> None:
    """INFO on rank 0, warnings only elsewhere, with the rank in every line."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def preflight(cfg, world_size: int, resume: str | None) -> None:
    """Checks that need no process group: the DeepSpeed JSON agrees with the config, shards exist, the
    run directory may be used (every rank checks before any rank can create it: that needs the group)."""
    from mip_dist.config import ConfigError
    from mip_dist.engine.ds_config import load_ds_config
    from mip_dist.engine.trainer import RunDirError, resolve_run_dir

    load_ds_config(cfg, world_size)
    pretrained = cfg.model.pretrained
    if pretrained and not pretrained.startswith("timm:") and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained: no such file {pretrained!r}; download the timm ViT checkpoint there, "
                          "pass model.pretrained=timm:<name> to let timm download it, or model.pretrained='' "
                          "to train from scratch")
    if cfg.data.dataset == "synthetic" and not cfg.data.train_urls:
        prepare_synthetic(cfg, world_size)
    if not cfg.data.train_urls and not (Path(cfg.data.shards) / "index.json").is_file():
        raise ConfigError(f"data.shards: {cfg.data.shards!r} has no index.json; write shards first "
                          "(launch/make_shards.py) or point data.shards at them")
    if not cfg.data.train_urls:
        from mip_dist.data.shards import ShardError, read_index
        from mip_dist.engine.run_checks import check_shards_for_run

        try:
            index = read_index(cfg.data.shards)  # a broken index (e.g. a test key stored twice) fails here
        except ShardError as exc:
            raise ConfigError(f"data.shards: {exc}") from exc
        check_shards_for_run(cfg, index, cfg.data.shards)
    else:
        from mip_dist.data.stream import DataError, resolve_train_urls

        try:
            resolve_train_urls(cfg.data)  # bad or refused URLs fail before any process group
        except (DataError, ValueError) as exc:
            raise ConfigError(f"data.train_urls: {exc}") from exc
    try:
        resolve_run_dir(cfg, resume)
    except (RunDirError, FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from exc


def prepare_synthetic(cfg, world_size: int, wait_s: float = 1800.0) -> None:
    """Make (or remake, after a generator change) the synthetic set and its shards: local rank 0 writes, others wait;
    every rank first refuses folders the demo does not own (a real dataset's tree or shards), before any write."""
    import time

    from mip_dist.data.prepare import check_synthetic_targets, ensure_synthetic_shards, synthetic_shards_ready

    index = Path(cfg.data.shards) / "index.json"
    check_synthetic_targets(cfg.data)
    if synthetic_shards_ready(cfg.data):
        return
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 or world_size == 1:
        print(f"preparing the synthetic visible-infrared set at {cfg.data.root} -> shards {cfg.data.shards}")
        ensure_synthetic_shards(cfg.data, progress=int(os.environ.get("RANK", "0")) == 0)
        return
    deadline = time.monotonic() + wait_s
    while not synthetic_shards_ready(cfg.data):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {wait_s:.0f}s for local rank 0 to write {index}")
        time.sleep(2.0)


def demo_resume(cfg) -> str | None:
    """The demo continues its newest unfinished run (a checkpoint, no FINISHED marker), else starts anew."""
    from mip_dist.engine.checkpoint import resolve_resume
    from mip_dist.engine.trainer import FINISHED

    tag = resolve_resume("auto", None, Path(cfg.train.output_dir))
    if tag is None or (tag.parent.parent / FINISHED).exists():
        return None
    print(f"resuming the unfinished demo run {tag.parent.parent} (from {tag.name})")
    return str(tag)


BASELINE = ["model.use_mpl=false", "model.use_ipg=false", "model.iael_heads=false", "loss.iael=false"]


def run_ablation(args: argparse.Namespace) -> int:
    """Baseline vs MIP: two single-process runs of the same config, then one table with both."""
    import json
    import subprocess
    import time

    from mip_dist.eval.report import format_table

    config = args.config or str(REPO / "configs" / "demo_ablation.yaml")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    merged = {}
    for name, extra in (("baseline", BASELINE), ("mip", [])):
        run_name = f"ablation-{stamp}-{name}"
        print(f"== training {name} ({run_name})", flush=True)
        cmd = [sys.executable, __file__, "--config", config, *args.overrides, *extra, f"train.run_name={run_name}"]
        code = subprocess.call(cmd)
        if code != 0:
            print(f"error: the {name} run exited with code {code}", file=sys.stderr)
            return code
        from mip_dist.config import load_config

        out_dir = Path(load_config(config, args.overrides).train.output_dir) / run_name
        results = json.loads((out_dir / "results.json").read_text())["results"]
        merged.update({f"{name}:{k}": v for k, v in results.items() if isinstance(v, dict)})
    print(format_table(dict(sorted(merged.items(), key=lambda kv: kv[0].split(":")[1]))))
    return 0


def print_results(run_dir: Path) -> None:
    """The final evaluation table, if the run wrote one."""
    import json

    from mip_dist.eval.report import format_table

    path = run_dir / "results.json"
    if path.is_file():
        print(format_table(json.loads(path.read_text())["results"]))
        print(f"results: {path}")


def leave(code: int) -> None:
    """Exit now after an error inside the process group (interpreter teardown with live gloo threads
    can abort the process and hide the exit code)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (any error: one line, code 2; traceback with --debug)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from mip_dist.cli import debug_requested, report_error
    from mip_dist.config import ConfigError, load_config

    debug = debug_requested(args.debug)
    if args.ablation:
        try:
            return run_ablation(args)
        except Exception as exc:  # noqa: BLE001 - one line; --debug shows the traceback
            return report_error(exc, debug, known=(ConfigError,))
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)

    path = args.config
    try:
        path = config_path(args.config)
        cfg = load_config(path, args.overrides)
        if args.config is None and args.resume is None:  # the demo: never overwrite, continue if cut off
            args.resume = demo_resume(cfg)
        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")), args.resume)
    except Exception as exc:  # noqa: BLE001 - before any process group: one line, exit 2
        return report_error(exc, debug, known=(ConfigError,), prefix=f"{path}: " if path else "")

    from mip_dist.engine.distributed import init_distributed, shutdown
    from mip_dist.engine.checkpoint import CheckpointError, CheckpointWriteError
    from mip_dist.engine.trainer import RunDirError, Trainer, TrainingDiverged

    env = init_distributed(cfg.train.device, args.local_rank, cfg.train.collective_timeout_s)
    try:
        summary = Trainer(cfg, env, resume=args.resume).fit()
    except (RunDirError, CheckpointError, CheckpointWriteError) as exc:  # one line, not a traceback
        report_error(exc, debug, known=(RunDirError, CheckpointError, CheckpointWriteError))
        leave(EXIT_CONFIG)
    except TrainingDiverged as exc:  # agreed by every rank
        print(f"error: training diverged: {exc}", file=sys.stderr)
        leave(EXIT_DIVERGED)
    except Exception as exc:  # noqa: BLE001 - inside the process group: one line per rank, then exit now
        report_error(exc, debug, prefix=f"rank {env.rank}: ")
        leave(EXIT_CONFIG)
    shutdown()
    if env.is_main:
        print(f"{summary['status']}: step {summary['step']}, run directory {summary['run_dir']}")
        print_results(Path(summary["run_dir"]))
    return EXIT_SIGTERM if summary["status"] == "interrupted" else 0


if __name__ == "__main__":
    sys.exit(main())
