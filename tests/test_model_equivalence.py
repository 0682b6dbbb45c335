"""Exact compute (prompts as keys/values only, IPG query rows only) equals the literal concat form.

Eval-mode outputs and gradients of every parameter agree to fp32 rounding (relative error <= 1e-5),
for MIP, each ablation, IPG without MPL, fusion IPG and no-JPM, with batches of mixed and of single
modality. Train mode (batch-statistics BatchNorm, which amplifies fp32 rounding over a batch of 3-4)
is checked in float64.
"""
from __future__ import annotations

import pytest
import torch

from conftest import NO_NOISE, inputs, make_model, output_tensors, params_by_category, rel_err, small_cfg

TOL = 1e-5
CASES = {
    "tiny": ("tiny.yaml", []),
    "baseline": ("ablation_baseline.yaml", []),
    "mpl": ("ablation_mpl.yaml", []),
    "mpl_ipg": ("ablation_mpl_ipg.yaml", []),
    "mip": ("ablation_mpl_ipg_iael.yaml", []),
    "ipg_only": ("ablation_mpl_ipg_iael.yaml", ["model.use_mpl=false"]),
    "fusion": ("ablation_mpl_ipg_iael.yaml", ["model.ipg_mode=fusion"]),
    "no_jpm": ("ablation_mpl_ipg_iael.yaml", ["model.jpm=false", "model.prompted_layers=3"]),
}
BATCHES = {"mixed": [0, 1, 1, 0], "infrared": [0, 0, 0], "visible": [1, 1, 1]}


def _run(model, impl, images, mod, cam):
    model.attention_impl = impl
    return model(images, mod, cam)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("case", list(CASES))
def test_eval_outputs_match_concat(case, batch):
    name, extra = CASES[case]
    cfg = small_cfg(name, extra)
    model = make_model(cfg).eval()
    images, mod, cam = inputs(cfg, BATCHES[batch])
    with torch.no_grad():
        exact = output_tensors(_run(model, "torch", images, mod, cam))
        feat_exact = model.extract(images, mod, cam)
        literal = output_tensors(_run(model, "concat", images, mod, cam))
        feat_literal = model.extract(images, mod, cam)
    assert exact.keys() == literal.keys()
    for key in exact:
        assert rel_err(exact[key], literal[key]) <= TOL, key
    assert rel_err(feat_exact, feat_literal) <= TOL


def _grads(model, impl, images, mod, cam, weights):
    model.zero_grad(set_to_none=True)
    out = output_tensors(_run(model, impl, images, mod, cam))
    loss = sum((w * out[k]).sum() for k, w in weights.items())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare_grads(model, images, mod, cam, tol):
    with torch.no_grad():
        shapes = {k: v.shape for k, v in output_tensors(model(images, mod, cam)).items()}
    g = torch.Generator().manual_seed(3)
    weights = {k: torch.randn(s, generator=g).to(images.dtype) for k, s in shapes.items()}
    exact = _grads(model, "torch", images, mod, cam, weights)
    literal = _grads(model, "concat", images, mod, cam, weights)
    assert exact.keys() == literal.keys()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(exact) == trainable  # every trainable parameter is used
    for n in exact:
        assert rel_err(exact[n], literal[n]) <= tol, n


@pytest.mark.parametrize("batch", ["mixed", "infrared"])
@pytest.mark.parametrize("case", list(CASES))
def test_eval_gradients_match_concat(case, batch):
    name, extra = CASES[case]
    cfg = small_cfg(name, extra)
    model = make_model(cfg).eval()
    _compare_grads(model, *inputs(cfg, BATCHES[batch]), tol=TOL)


@pytest.mark.parametrize("case", ["mip", "fusion"])
def test_train_gradients_match_concat_float64(case):
    name, extra = CASES[case]
    cfg = small_cfg(name, extra + NO_NOISE)
    model = make_model(cfg).train().double()
    images, mod, cam = inputs(cfg, BATCHES["mixed"])
    _compare_grads(model, images.double(), mod, cam, tol=1e-10)


def test_every_prompt_and_ipg_parameter_gets_gradient():
    for case in ("mip", "fusion"):
        name, extra = CASES[case]
        cfg = small_cfg(name, extra + NO_NOISE)
        model = make_model(cfg).train()
        images, mod, cam = inputs(cfg, BATCHES["mixed"])
        out = model(images, mod, cam)
        loss = sum(t.square().sum() for t in output_tensors(out).values())
        loss.backward()
        groups = params_by_category(model)
        assert groups["prompt"] and groups["ipg"]
        for n, p in groups["prompt"] + groups["ipg"]:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        bank_grad = model.mpl.bank.grad
        assert bank_grad[0].abs().sum() > 0 and bank_grad[1].abs().sum() > 0  # both modality entries


def test_single_modality_batch_leaves_other_bank_entry_untouched():
    cfg = small_cfg("ablation_mpl.yaml", NO_NOISE)
    model = make_model(cfg).train()
    images, mod, cam = inputs(cfg, BATCHES["visible"])
    model(images, mod, cam).global_feat.square().sum().backward()
    assert model.mpl.bank.grad[0].abs().sum() == 0 and model.mpl.bank.grad[1].abs().sum() > 0


def test_prompt_dropout_is_drawn_once_on_the_bank():
    """With prompt dropout on, both forms draw one mask on the shared bank, so same seed -> same output."""
    cfg = small_cfg("ablation_mpl.yaml", ["model.prompt_dropout=0.5", "model.drop_path=0.0"])
    model = make_model(cfg).train()
    images, mod, cam = inputs(cfg, [0, 0, 1, 1])
    torch.manual_seed(11)
    exact = _run(model, "torch", images, mod, cam).global_feat
    torch.manual_seed(11)
    literal = _run(model, "concat", images, mod, cam).global_feat
    torch.manual_seed(12)
    other = _run(model, "concat", images, mod, cam).global_feat
    assert rel_err(exact, literal) <= TOL
    assert rel_err(other, literal) > 1e-3  # the dropout really is active
