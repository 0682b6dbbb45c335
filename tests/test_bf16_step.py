"""The paper's precision, bf16, at ZeRO-0 and ZeRO-1: DeepSpeed's BF16_Optimizer (not FP16_UnfusedOptimizer,
whose overflow check reads every gradient back to the host), at most 2 host-sync ops per real Trainer step,
the fp32 master weights and optimizer state restored exactly from a checkpoint."""
from __future__ import annotations

import pytest

from conftest import run_probe
from test_train_distributed import make_tiny_shards

MAX_SYNCS_PER_STEP = 2  # BF16_Optimizer: "is the global norm finite?" and "does it clip?"

PROBE = '''
import json, sys
import torch
from fake_cuda import SyncCounter
from mip_dist.config import load_config
from mip_dist.engine.distributed import init_distributed, shutdown
from mip_dist.engine.metrics_log import StepTimer
from mip_dist.engine.trainer import Trainer

overrides, out = json.loads(sys.argv[1]), {}
env = init_distributed("cpu")
for stage in (0, 1):
    cfg = load_config("configs/tiny.yaml", overrides + [f"train.zero_stage={stage}", f"train.run_name=bf16z{stage}"])
    trainer = Trainer(cfg, env)
    trainer.timer, trainer.window = StepTimer(), {}
    batches, syncs = iter(trainer.stream), []
    for _ in range(3):
        batch = next(batches)
        trainer.micro_in_epoch += 1
        with SyncCounter() as counter:
            trainer._train_step(batch, 0.0)
        syncs.append(counter.ops)
    tag = trainer.save()
    again = Trainer(cfg, env, resume=str(tag))

    def masters(t):  # BF16_Optimizer's flat fp32 partitions; [] under another wrapper
        return [m.detach().clone() for m in getattr(t.engine.optimizer, "fp32_groups_flat_partition", [])]

    def moments(t):
        opt = getattr(t.engine.optimizer, "optimizer", t.engine.optimizer)
        return [s.clone() for g in opt.param_groups for p in g["params"] for s in opt.state[p].values()
                if torch.is_tensor(s) and s.numel() > 1]

    sd, sd2 = trainer.engine.module.state_dict(), again.engine.module.state_dict()
    out[stage] = {
        "optimizer": type(trainer.engine.optimizer).__name__,
        "syncs": syncs,
        "grad_norm_logged": bool(torch.isfinite(torch.as_tensor(trainer.window["grad_norm"][-1])).all()),
        "weights": all(torch.equal(sd[k], sd2[k]) for k in sd),
        "masters": len(masters(trainer)) > 0 and all(torch.equal(a, b) for a, b in zip(masters(trainer),
                                                                                         masters(again))),
        "moments": len(moments(trainer)) > 0 and all(torch.equal(a, b) for a, b in zip(moments(trainer),
                                                                                         moments(again))),
        "position": [again.step, again.micro_in_epoch],
    }
shutdown(wait=False)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def bf16_probe(tmp_path_factory):
    """Both stages in one process: 3 bf16 steps each, host syncs counted, then a checkpoint round trip."""
    root = tmp_path_factory.mktemp("bf16")
    overrides = make_tiny_shards(root) + ["train.precision=bf16", "optim.name=adamw", "optim.grad_clip=5.0"]
    return {int(k): v for k, v in run_probe(PROBE, root, overrides).items()}


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_step_uses_bf16_optimizer_with_at_most_two_host_syncs(bf16_probe, stage):
    result = bf16_probe[stage]
    for ops in result["syncs"][1:]:  # the first step may warm up; every later one is the steady state
        assert len(ops) <= MAX_SYNCS_PER_STEP, (stage, len(ops), ops[:5])
    assert result["optimizer"] == "BF16_Optimizer"
    assert result["grad_norm_logged"]


@pytest.mark.parametrize("stage", [0, 1])
def test_bf16_checkpoint_restores_masters_and_moments_exactly(bf16_probe, stage):
    result = bf16_probe[stage]
    assert result["weights"] and result["masters"] and result["moments"], result
    assert result["position"] == [3, 3]
