"""The demo's ablation: the baseline ViT and MIP trained on the same data, one after the other, in one table.

Each training is its own process (the launcher run again with the baseline's switches, then without), so
the two runs share nothing but the config and the data.
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

from mip_dist.config import load_config
from mip_dist.eval.report import format_table

log = logging.getLogger(__name__)

# MIP without its three parts: no modality prompts, no instance prompt generator, no IAEL heads or loss
BASELINE = ("model.use_mpl=false", "model.use_ipg=false", "model.iael_heads=false", "loss.iael=false")


class AblationError(RuntimeError):
    """One of the two trainings failed; `code` is its exit code."""

    def __init__(self, name: str, code: int) -> None:
        super().__init__(f"the {name} run exited with code {code}")
        self.code = code


def run_ablation(launch: list[str], config: str, overrides: list[str]) -> str:
    """Train the baseline, then MIP, by running `launch` (the training command) with `config` and `overrides`;
    returns their final results as one table (rows sorted by setting, baseline first)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output_dir = Path(load_config(config, overrides).train.output_dir)  # a bad config fails before any training
    merged: dict[str, dict] = {}
    for name, extra in (("baseline", BASELINE), ("mip", ())):
        run_name = f"ablation-{stamp}-{name}"
        log.info("training %s (%s)", name, run_name)
        code = subprocess.call([*launch, "--config", config, *overrides, *extra, f"train.run_name={run_name}"])
        if code != 0:
            raise AblationError(name, code)
        results = json.loads((output_dir / run_name / "results.json").read_text())["results"]
        merged.update({f"{name}:{k}": v for k, v in results.items() if isinstance(v, dict)})
    return format_table(dict(sorted(merged.items(), key=lambda kv: kv[0].split(":")[1])))
