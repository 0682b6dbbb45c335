"""Run launch/train.py with probes on ZeRO-3 parameter residency (used by test_train_distributed).

Records, per rank, the fraction of parameter elements gathered (ds_status AVAILABLE) when each
backbone block starts its forward, and after each training step the fractions gathered and held in
this rank's partition (ds_tensor). Writes them to $ZERO3_PROBE_OUT/rank<r>.json.
"""
import json
import os
import runpy
import sys
from pathlib import Path

from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

from mip_dist.engine import trainer as trainer_module

_train_step = trainer_module.Trainer._train_step


def _fraction_available(params: list) -> float:
    total = sum(p.ds_numel for p in params)
    return sum(p.ds_numel for p in params if p.ds_status == ZeroParamStatus.AVAILABLE) / total


def _probed_step(self, batch, data_wait):
    params = list(self.engine.module.parameters())
    if not hasattr(self, "_probe"):
        self._probe = {"block_forward": [], "after_step": []}
        for block in self.engine.module.model.blocks:
            block.register_forward_pre_hook(lambda m, a: self._probe["block_forward"].append(_fraction_available(params)))
    result = _train_step(self, batch, data_wait)
    total = sum(p.ds_numel for p in params)
    self._probe["after_step"].append({"available": _fraction_available(params),
                                      "partition": sum(p.ds_tensor.numel() for p in params) / total})
    out = Path(os.environ["ZERO3_PROBE_OUT"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{self.env.rank}.json").write_text(json.dumps(self._probe))
    return result


trainer_module.Trainer._train_step = _probed_step
train = Path(__file__).resolve().parent.parent / "launch" / "train.py"
sys.argv = [str(train)] + sys.argv[1:]
runpy.run_path(str(train), run_name="__main__")
