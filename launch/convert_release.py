"""Convert a checkpoint saved by the MIP authors' code into mip-dist's exported model format.

    python launch/convert_release.py their.pth out.pt [--config configs/mip_vitb16_sysu_release.yaml]
                                     [--bug-refine] [model.key=value ...]

The output ({"model", "config", "num_classes", "num_cameras"}, model.layout=release) evaluates with
launch/evaluate.py and fine-tunes with model.pretrained=out.pt. Sizes come from the tensors; --config
supplies the data/eval/train sections and the model keys the tensors cannot tell (image size, stride,
SIE coefficient, JPM shift/groups, dropouts).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from mip_dist.config import ConfigError, from_dict, load_config


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line: input, output, optional config and model overrides."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="their state dict (e.g. checkpoints/sysu.pth)")
    p.add_argument("out", help="exported model file to write (refuses to overwrite)")
    p.add_argument("--config", default=None, help="YAML config for the non-model sections (default: built-in)")
    p.add_argument("--bug-refine", action="store_true",
                   help="their run had MODEL.BUG_REFINE on: the IPG queries are base.prompt_embed, not zeros")
    p.add_argument("overrides", nargs="*", help="config overrides such as model.sie_coef=3.0")
    return p.parse_intermixed_args(argv)


def convert(checkpoint: str, out: str, config: Optional[str] = None, overrides: Optional[list[str]] = None,
            bug_refine: bool = False) -> Path:
    """Read their checkpoint, build the release model, write our exported file; returns its path."""
    from mip_dist.engine.export import export_model
    from mip_dist.model.release import NOT_INFERRED, release_blob

    settable = {f"model.{k}" for k in NOT_INFERRED}
    fixed = [o.split("=", 1)[0] for o in overrides or []  # model.layout=release states what the result is anyway
             if o.startswith("model.") and o.split("=", 1)[0] not in settable and o != "model.layout=release"]
    if fixed:  # release_blob takes every other model key from the tensors: refuse rather than ignore
        raise ConfigError(f"{', '.join(fixed)}: read from the checkpoint's tensors, not settable; the model keys "
                          f"an override may set are {', '.join(sorted(settable))}")
    target = Path(out)
    if target.exists():
        raise FileExistsError(f"{target} exists; pick another output path")
    ensure_out_folder(target)
    base = load_config(config, overrides) if config or overrides else None
    blob = release_blob(checkpoint, base=base, bug_refine=bug_refine)
    return export_model(target, blob["model"], from_dict(blob["config"]), blob["num_classes"], blob["num_cameras"])


class OutputFolderError(ValueError):
    """The output file's folder cannot be made or written."""


def ensure_out_folder(target: Path) -> None:
    """Make the output file's folder now (a missing or unwritable one fails before the conversion's work)."""
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputFolderError(f"{target}: cannot create its folder {folder} ({exc.strerror or exc})") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{target}: its folder {folder} is not writable; pick another output path")


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 2 with a one-line message for unusable inputs."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = convert(args.checkpoint, args.out, args.config, args.overrides, args.bug_refine)
    except (ConfigError, ValueError, FileExistsError) as exc:  # ReleaseCheckpointError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
