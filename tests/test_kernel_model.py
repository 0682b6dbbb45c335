"""The tiny MIP with attention.impl=triton (Triton interpreter on CPU) matches impl=concat.

Outputs, test features and every parameter gradient agree to fp32 rounding, on a mixed-modality
batch (both bank entries read) and a single-modality one, in both backward modes.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mip_dist.config import load_config
from mip_dist.model import build_model

from test_kernel_cuda_order import skip_unless_cpu_kernels

TINY = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = 1e-4  # relative (norm) error; float32 end to end


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def flat_outputs(out) -> dict[str, torch.Tensor]:
    """Every tensor of the model's output dataclass, named."""
    named = {}
    for f in dataclasses.fields(out):
        value = getattr(out, f.name)
        if isinstance(value, torch.Tensor):
            named[f.name] = value
        elif isinstance(value, (list, tuple)):
            named.update({f"{f.name}.{i}": t for i, t in enumerate(value) if isinstance(t, torch.Tensor)})
    return named


def run(model, impl: str, images, modality, camera) -> tuple[dict, dict, torch.Tensor]:
    """Outputs, parameter gradients of a fixed random projection of them, and test features."""
    model.attention_impl = impl
    model.zero_grad(set_to_none=True)
    out = flat_outputs(model(images, modality, camera))
    g = torch.Generator().manual_seed(5)
    loss = sum((torch.randn(t.shape, generator=g).to(t) * t).sum() for t in out.values())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        feats = model.extract(images, modality, camera)
    return {k: t.detach() for k, t in out.items()}, grads, feats


@pytest.mark.parametrize("modality, deterministic", [([0, 1, 1], False), ([0, 1, 1], True), ([1, 1], False)],
                         ids=["mixed", "mixed-deterministic", "visible"])
@pytest.mark.parametrize("device", DEVICES)
def test_tiny_model_triton_matches_concat(device, modality, deterministic, monkeypatch):
    if device == "cpu":
        skip_unless_cpu_kernels()
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the real kernels, interpreted
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled
    cfg = load_config(TINY, ["model.drop_path=0.0", "model.prompt_dropout=0.0", "model.drop_rate=0.0"])
    torch.manual_seed(0)
    attention = dataclasses.replace(cfg.attention, impl="concat", deterministic=deterministic)
    model = build_model(cfg.model, attention, 5, 3).to(device).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(len(modality), 3, *cfg.model.img_size, generator=g).to(device)
    mod = torch.tensor(modality, device=device)
    cam = torch.randint(0, 3, (len(modality),), generator=g).to(device)

    out_t, grads_t, feats_t = run(model, "triton", images, mod, cam)
    out_c, grads_c, feats_c = run(model, "concat", images, mod, cam)
    assert out_t.keys() == out_c.keys()
    for k in out_c:
        assert rel_err(out_t[k], out_c[k]) <= TOL, k
    assert rel_err(feats_t, feats_c) <= TOL
    assert grads_t.keys() == grads_c.keys() and len(grads_c) > 0
    for n in grads_c:
        assert rel_err(grads_t[n], grads_c[n]) <= TOL, n
