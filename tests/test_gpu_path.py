"""The GPU training path, proven on a CPU-only machine.

- The paper-sized model (ViT-B, bf16, batch 64) runs forward + MIPLoss + backward on fake CUDA
  tensors for impl torch and triton (through the custom op's fake implementation): any CPU/CUDA mix,
  dtype clash or host read raises.
- Model + loss + kernel dispatch make no host syncs; one Trainer step reads the host once.
- The trainer's collective runs on the backend's device (an NCCL group takes only CUDA tensors).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from mip_dist.config import load_config
from mip_dist.engine import trainer as trainer_module
from mip_dist.engine.metrics_log import StepTimer
from mip_dist.losses import MIPLoss
from mip_dist.model import build_model

from fake_cuda import SyncCounter, fake_cuda_mode, walk_backward
from conftest import inputs, make_model, run_probe, small_cfg

REPO = Path(__file__).resolve().parent.parent
SYSU_CLASSES, SYSU_CAMERAS = 395, 6


def _pk_labels(batch: int, k: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """pid and modality of a PK batch: first half visible, second half infrared, same identity order."""
    half = torch.arange(batch // 2) // k
    return torch.cat([half, half]), torch.cat([torch.ones(batch // 2), torch.zeros(batch // 2)]).long()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_paper_model_trains_on_fake_cuda_in_bf16(impl):
    cfg = load_config(REPO / "configs" / "mip_vitb16_sysu.yaml", ["model.pretrained=", f"attention.impl={impl}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, SYSU_CLASSES, SYSU_CAMERAS).train()
    B = 64
    pids, modality = _pk_labels(B)
    with fake_cuda_mode():
        model = model.to("cuda", torch.bfloat16)
        images = torch.randn(B, 3, *cfg.model.img_size, device="cuda", dtype=torch.bfloat16)
        out = model(images, modality.cuda(), torch.zeros(B, dtype=torch.long, device="cuda"))
        loss, parts = MIPLoss(cfg.loss)(trainer_module.to_float32(out), pids.cuda(), modality.cuda(), epoch=100)
        assert loss.device.type == "cuda" and loss.dtype == torch.float32
        assert all(v.device.type == "cuda" for v in parts.values())
        walk_backward(loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"no gradient for {missing[:5]}"
    wrong = [n for n, g in grads.items() if g.device.type != "cuda" or g.dtype != torch.bfloat16]
    assert not wrong, f"gradients off cuda/bf16: {wrong[:5]}"


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_model_loss_and_kernel_make_no_host_syncs(impl, monkeypatch):
    if impl == "triton":
        from test_kernel_cuda_order import skip_unless_cpu_kernels

        skip_unless_cpu_kernels()
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton on CPU tensors runs interpreted
    cfg = small_cfg("tiny.yaml")
    model = make_model(cfg, impl).train()
    images, modality, camera = inputs(cfg, [1, 1, 1, 1, 0, 0, 0, 0])
    pids = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    with SyncCounter() as counter:
        out = model(images, modality, camera)
        loss, _ = MIPLoss(cfg.loss)(out, pids, modality, epoch=100)
        loss.backward()
    assert counter.count == 0, counter.ops


class _StubEngine:
    """The slice of the DeepSpeed engine `_train_step` uses, for a model on fake CUDA tensors."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = trainer_module.DictOutput(model, zero3=False)
        self.device = torch.device("cuda", 0)
        self.global_steps = self.micro_steps = 0

    def __call__(self, *args):
        return self.module(*args)

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def backward(self, loss: torch.Tensor) -> None:
        walk_backward(loss)

    def step(self) -> None:
        self.global_steps += 1
        self.micro_steps += 1


def test_train_step_collective_runs_on_the_nccl_device(monkeypatch):
    """A 2-rank NCCL job as _train_step sees it: every all_reduce tensor must be on CUDA, and the step
    reads the host once (after the collective)."""
    cfg = small_cfg("tiny.yaml")
    model = make_model(cfg, "torch").train()
    images, modality, camera = inputs(cfg, [1, 1, 1, 1, 0, 0, 0, 0])
    batch = {"images": images, "pid": torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]), "camera": camera,
             "modality": modality}
    reduced, reads = [], []

    def nccl_all_reduce(t, op=None, group=None, async_op=False):
        if t.device.type != "cuda":
            raise RuntimeError(f"NCCL: tensor on {t.device}; the nccl backend takes CUDA tensors only")
        reduced.append(t)

    def to_host(t):
        assert t.device.type == "cuda" and reduced, "the host read comes after the collective, from the device"
        reads.append(tuple(t.shape))
        return [0.0] * t.numel()

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(dist, "all_reduce", nccl_all_reduce)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(trainer_module, "to_host", to_host, raising=False)

    t = trainer_module.Trainer.__new__(trainer_module.Trainer)
    t.cfg, t.env = cfg, type("Env", (), {"world_size": 2, "is_main": True, "rank": 0})()
    t.num_classes, t.num_cameras = 7, 3
    t.loss_fn, t.epoch, t._stop, t.bad_in_row = MIPLoss(cfg.loss), 0, False, 0
    t.timer, t.window, t.micro_per_epoch, t.accum = StepTimer(), {}, 10, 1
    t.clip_here = trainer_module.clips_in_trainer(cfg.train.precision, cfg.train.zero_stage)  # fp32: clips here
    t.ds_stage = 0  # fp32 without ZeRO: DeepSpeed stage 0
    with fake_cuda_mode():
        model = model.to("cuda")
        t.engine, t.device, t.dtype = _StubEngine(model), torch.device("cuda", 0), torch.float32
        t.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for g in t.optimizer.param_groups:
            g["initial_lr"] = 0.1
        stepped, stop = t._train_step(batch, data_wait=0.0)
    assert stepped and not stop
    assert len(reduced) == 1 and len(reads) == 1, (len(reduced), reads)
    assert reads[0] == (7,), "one tensor: loss, iael, id, msel, triplet, non-finite flag, stop flag"
    assert set(t.window) == {"loss", "iael", "id", "msel", "triplet", "grad_norm"}


def test_one_trainer_step_reads_the_host_once(tmp_path):
    """A real single-rank Trainer (DeepSpeed, gloo): steps 2 and 3 dispatch no sync op, and call the one
    device->host read once each."""
    from test_train_distributed import make_tiny_shards

    steps = run_probe(_STEP_PROBE, tmp_path, make_tiny_shards(tmp_path))
    for ops, reads in steps[1:]:
        assert ops == [] and reads == 1, steps


_STEP_PROBE = '''
import json, sys
from fake_cuda import SyncCounter
from mip_dist.config import load_config
from mip_dist.engine import trainer as trainer_module
from mip_dist.engine.distributed import init_distributed, shutdown
from mip_dist.engine.metrics_log import StepTimer

cfg = load_config("configs/tiny.yaml", json.loads(sys.argv[1]))
env = init_distributed("cpu")
trainer = trainer_module.Trainer(cfg, env)
trainer.timer, trainer.window = StepTimer(), {}
real_to_host, reads = getattr(trainer_module, "to_host", None), []
if real_to_host is not None:  # the step's one device->host read goes through it
    trainer_module.to_host = lambda t: reads.append(1) or real_to_host(t)
batches, steps = iter(trainer.stream), []
for _ in range(3):
    batch = next(batches)
    reads.clear()
    with SyncCounter() as counter:
        trainer._train_step(batch, 0.0)
    steps.append([counter.ops, len(reads)])
shutdown(wait=False)
print(json.dumps(steps))
'''
