"""Losses against hand-computed values: triplet (hard mining, soft/fixed margin), MSEL, IAEL, ID, gating."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mip_dist.config import LossConfig
from mip_dist.losses import MIPLoss, euclidean_dist, iael_loss, msel_loss, triplet_loss
from mip_dist.model import MIPOutput


def _log1pexp(x: float) -> float:
    return math.log1p(math.exp(x))


def test_euclidean_dist_matches_cdist():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 8, generator=g), torch.randn(3, 8, generator=g)
    torch.testing.assert_close(euclidean_dist(x, y), torch.cdist(x, y), atol=1e-5, rtol=1e-5)


def test_triplet_hard_mining_soft_and_fixed_margin():
    feat = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    pids = torch.tensor([0, 0, 1, 1])
    # hardest positive / negative per anchor: (1, 3), (1, 2), (4, 2), (4, 6)
    pairs = [(1, 3), (1, 2), (4, 2), (4, 6)]
    soft = sum(_log1pexp(ap - an) for ap, an in pairs) / 4
    assert triplet_loss(feat, pids).item() == pytest.approx(soft, rel=1e-5)
    hinge = sum(max(0.0, ap - an + 0.3) for ap, an in pairs) / 4  # = 2.3 / 4
    assert triplet_loss(feat, pids, margin=0.3).item() == pytest.approx(hinge, rel=1e-5)


def test_triplet_skips_anchors_without_positive_or_negative():
    feat = torch.tensor([[0.0], [1.0], [5.0]])
    pids = torch.tensor([0, 0, 1])  # anchor 2 has no positive
    expected = (_log1pexp(1 - 5) + _log1pexp(1 - 4)) / 2
    assert triplet_loss(feat, pids).item() == pytest.approx(expected, rel=1e-5)
    assert triplet_loss(feat[:2], pids[:2]).item() == 0.0  # one identity: no negatives at all


def test_msel_four_samples_by_hand():
    # one identity: IR at 0 and 2, visible at 5 and 6
    feat = torch.tensor([[0.0], [2.0], [5.0], [6.0]], requires_grad=True)
    pids = torch.zeros(4, dtype=torch.long)
    modality = torch.tensor([0, 0, 1, 1])
    # IR anchors: (5.5 - 2)^2 = 12.25, (3.5 - 2)^2 = 2.25; visible: (4 - 1)^2 = 9, (5 - 1)^2 = 16
    expected = 0.5 * ((12.25 + 2.25) / 2 + (9 + 16) / 2)
    loss = msel_loss(feat, pids, modality)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert feat.grad.abs().sum() > 0


def _pmt_msel(inputs: torch.Tensor, targets: torch.Tensor, num_pos: int) -> torch.Tensor:
    """PMT's MSEL as released (batch = N visible then N infrared, K = num_pos per identity per modality)."""
    target, _ = targets.chunk(2, 0)
    N = target.size(0)
    dist = euclidean_dist(inputs, inputs)
    is_pos = target.expand(N, N).eq(target.expand(N, N).t())
    intra_rgb = (is_pos * dist[:N, :N]).topk(num_pos - 1, dim=1).values.mean(1)
    intra_ir = (is_pos * dist[N:, N:]).topk(num_pos - 1, dim=1).values.mean(1)
    cross_rgb = dist[:N, N:][is_pos].view(N, -1).mean(1)
    cross_ir = dist[N:, :N][is_pos].view(N, -1).mean(1)
    return ((cross_rgb - intra_rgb).pow(2).mean() + (cross_ir - intra_ir).pow(2).mean()) / 2


def test_msel_matches_pmt_release_on_pk_batch():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(12, 6, generator=g)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    pids = torch.cat([ids, ids])
    modality = torch.tensor([1] * 6 + [0] * 6)
    ours = msel_loss(feat, pids, modality)
    torch.testing.assert_close(ours, _pmt_msel(feat, pids, num_pos=2), rtol=1e-5, atol=1e-6)
    perm = torch.randperm(12, generator=g)  # our version does not depend on the batch layout
    torch.testing.assert_close(msel_loss(feat[perm], pids[perm], modality[perm]), ours, rtol=1e-5, atol=1e-6)


def test_msel_single_modality_batch_is_zero_and_differentiable():
    feat = torch.randn(4, 3, requires_grad=True)
    loss = msel_loss(feat, torch.tensor([0, 0, 1, 1]), torch.ones(4, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert feat.grad is not None and feat.grad.abs().sum() == 0


def test_iael_is_mean_of_layer_cross_entropies():
    logits = [torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])]
    pids = torch.tensor([0, 1])
    lse = lambda row: math.log(sum(math.exp(v) for v in row))  # noqa: E731
    ce0 = ((lse([2, 0, 0]) - 2) + (lse([0, 1, 0]) - 1)) / 2
    ce1 = (lse([0, 0, 0]) + lse([0, 0, 3])) / 2
    assert iael_loss(logits, pids).item() == pytest.approx((ce0 + ce1) / 2, rel=1e-6)


def _fake_output(B=4, C=3, K=5, P=2, layers=2, seed=0) -> MIPOutput:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, requires_grad=True)  # noqa: E731
    return MIPOutput(global_feat=r(B, C), local_feats=r(B, P, C), bn_feats=[r(B, C) for _ in range(1 + P)],
                     logits=[r(B, K) for _ in range(1 + P)], prompt_logits=[r(B, K) for _ in range(layers)],
                     instance_prompts=[r(B, C) for _ in range(layers)])


def test_mip_loss_combines_parts_with_weights_and_start_epochs():
    cfg = LossConfig(id_weight=1.0, label_smoothing=0.1, triplet_weight=1.0, triplet_margin=None,
                     global_weight=0.5, msel_weight=0.5, msel_start_epoch=10, iael=True, iael_weight=0.5,
                     iael_start_epoch=2)
    out = _fake_output(B=8)
    pids, modality = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    crit = MIPLoss(cfg)
    ce = [F.cross_entropy(lg, pids, label_smoothing=0.1) for lg in out.logits]
    id_ref = 0.5 * ce[0] + 0.5 * (ce[1] + ce[2]) / 2
    feats = [out.global_feat, out.local_feats[:, 0], out.local_feats[:, 1]]
    tri = [triplet_loss(f, pids) for f in feats]
    tri_ref = 0.5 * tri[0] + 0.5 * (tri[1] + tri[2]) / 2
    ms = [msel_loss(f, pids, modality) for f in feats]
    msel_ref = 0.5 * ms[0] + 0.5 * (ms[1] + ms[2]) / 2
    iael_ref = iael_loss(out.prompt_logits, pids, 0.1)

    total, parts = crit(out, pids, modality, epoch=0)
    parts = {k: float(v) for k, v in parts.items()}
    assert float(parts["id"]) == pytest.approx(id_ref.item(), rel=1e-6)
    assert float(parts["triplet"]) == pytest.approx(tri_ref.item(), rel=1e-6)
    assert parts["msel"] == 0.0 and parts["iael"] == 0.0
    assert total.item() == pytest.approx((id_ref + tri_ref).item(), rel=1e-6) == pytest.approx(parts["total"])

    total, parts = crit(out, pids, modality, epoch=2)
    assert float(parts["iael"]) == pytest.approx(iael_ref.item(), rel=1e-6) and parts["msel"] == 0.0
    total, parts = crit(out, pids, modality, epoch=10)
    expected = id_ref + tri_ref + 0.5 * msel_ref + 0.5 * iael_ref
    assert msel_ref.item() > 0 and float(parts["msel"]) == pytest.approx(msel_ref.item(), rel=1e-6)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in parts.values())
    total.backward()
    assert out.global_feat.grad is not None and out.prompt_logits[0].grad is not None

    _, parts = MIPLoss(LossConfig(iael=False))(out, pids, modality, epoch=50)
    assert parts["iael"] == 0.0


def test_label_smoothing_value():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    pids = torch.tensor([1])
    logp = torch.log_softmax(logits, 1)[0]
    expected = 0.9 * -logp[1] + 0.1 * -logp.mean()
    out = MIPOutput(torch.zeros(1, 2), None, [torch.zeros(1, 2)], [logits])
    _, parts = MIPLoss(LossConfig(label_smoothing=0.1))(out, pids, torch.tensor([0]), epoch=0)
    assert float(parts["id"]) == pytest.approx(expected.item(), rel=1e-6)
    assert parts["triplet"] == 0.0  # one sample: no pair to mine


def test_mip_loss_on_model_output_single_modality():
    from conftest import inputs, make_model, small_cfg

    cfg = small_cfg("tiny.yaml")
    model = make_model(cfg).train()
    images, mod, cam = inputs(cfg, [1, 1, 1, 1])
    pids = torch.tensor([0, 0, 3, 3])
    total, parts = MIPLoss(cfg.loss)(model(images, mod, cam), pids, mod, epoch=100)
    assert parts["msel"] == 0.0 and parts["iael"] > 0 and math.isfinite(float(parts["total"]))
    total.backward()
    assert model.mpl.bank.grad is not None and model.ipg.queries.grad.abs().sum() > 0
