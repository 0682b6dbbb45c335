"""MIP losses: identity CE, batch-hard triplet, MSEL (PMT) and IAEL, weighted and switched on by epoch."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mip_dist.config import LossConfig
from mip_dist.model.mip import MIPOutput

Tensor = torch.Tensor


def euclidean_dist(x: Tensor, y: Tensor) -> Tensor:
    """TransReID's pairwise euclidean distance [m, n]: sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, 1e-12))."""
    xx = x.pow(2).sum(1, keepdim=True)
    yy = y.pow(2).sum(1, keepdim=True).t()
    return (xx + yy - 2.0 * x @ y.t()).clamp(min=1e-12).sqrt()


def hard_example_mining(dist: Tensor, pids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per anchor: hardest positive (max, self excluded), hardest negative (min), and which anchors have both."""
    same = pids.unsqueeze(0) == pids.unsqueeze(1)
    eye = torch.eye(len(pids), dtype=torch.bool, device=dist.device)
    pos, neg = same & ~eye, ~same
    dist_ap = dist.masked_fill(~pos, float("-inf")).max(dim=1).values
    dist_an = dist.masked_fill(~neg, float("inf")).min(dim=1).values
    return dist_ap, dist_an, pos.any(1) & neg.any(1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` holds, 0 where it never does; no data-dependent shape, so no host sync."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def triplet_loss(feat: Tensor, pids: Tensor, margin: Optional[float] = None) -> Tensor:
    """Batch-hard triplet over the whole batch: soft margin log(1+exp(ap-an)) if margin is None, else hinge."""
    dist_ap, dist_an, valid = hard_example_mining(euclidean_dist(feat, feat), pids)
    gap = torch.where(valid, dist_ap - dist_an, torch.zeros_like(dist_ap))  # invalid anchors hold +-inf
    per_anchor = F.softplus(gap) if margin is None else F.relu(gap + margin)  # SoftMarginLoss / MarginRankingLoss
    return masked_mean(per_anchor, valid)


def msel_loss(feat: Tensor, pids: Tensor, modality: Tensor) -> Tensor:
    """PMT's modality-shared enhancement loss on euclidean distances.

    Per anchor: d_intra = mean distance to its same-modality positives (itself excluded), d_cross = mean
    distance to its other-modality positives; L = 0.5 * (mean over IR anchors of (d_cross - d_intra)^2 +
    the same over visible anchors). Anchors lacking either kind of positive are skipped; a modality with
    no usable anchor contributes 0 (so a single-modality batch gives 0).
    """
    dist = euclidean_dist(feat, feat)
    same_id = pids.unsqueeze(0) == pids.unsqueeze(1)
    same_mod = modality.unsqueeze(0) == modality.unsqueeze(1)
    eye = torch.eye(len(pids), dtype=torch.bool, device=feat.device)
    intra, cross = same_id & same_mod & ~eye, same_id & ~same_mod
    n_intra, n_cross = intra.sum(1), cross.sum(1)
    d_intra = (dist * intra).sum(1) / n_intra.clamp(min=1)
    d_cross = (dist * cross).sum(1) / n_cross.clamp(min=1)
    valid = (n_intra > 0) & (n_cross > 0)
    gap2 = (d_cross - d_intra).pow(2)
    return 0.5 * (masked_mean(gap2, valid & (modality == 0)) + masked_mean(gap2, valid & (modality == 1)))


def iael_loss(prompt_logits: list[Tensor], pids: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean over prompted layers of CE on the instance-prompt classifiers."""
    return torch.stack([F.cross_entropy(lg, pids, label_smoothing=label_smoothing) for lg in prompt_logits]).mean()


def split_global_local(values: list[Tensor], global_weight: float) -> Tensor:
    """g * values[0] + (1 - g) * mean(values[1:]); just values[0] without local parts."""
    if len(values) == 1:
        return values[0]
    return global_weight * values[0] + (1.0 - global_weight) * torch.stack(values[1:]).mean()


class MIPLoss(nn.Module):
    """Total MIP loss from a MIPOutput: id + triplet (+ MSEL from its start epoch) (+ IAEL from its start epoch)."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, out: MIPOutput, pids: Tensor, modality: Tensor, epoch: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, {"id", "triplet", "msel", "iael", "total"} as detached 0-dim tensors; inactive parts are 0).

        Nothing is read back to the host: the trainer reduces the parts on the device and reads them once."""
        c = self.cfg
        feats = out.feats
        id_loss = split_global_local(
            [F.cross_entropy(lg, pids, label_smoothing=c.label_smoothing) for lg in out.logits], c.global_weight)
        tri = split_global_local([triplet_loss(f, pids, c.triplet_margin) for f in feats], c.global_weight)
        total = c.id_weight * id_loss + c.triplet_weight * tri
        parts = {"id": id_loss, "triplet": tri}
        zero = id_loss.new_zeros(())
        msel = iael = zero
        if c.msel_weight > 0 and epoch >= c.msel_start_epoch:
            msel = split_global_local([msel_loss(f, pids, modality) for f in feats], c.global_weight)
            total = total + c.msel_weight * msel
        if c.iael and c.iael_weight > 0 and epoch >= c.iael_start_epoch and out.prompt_logits:
            iael = iael_loss(out.prompt_logits, pids, c.label_smoothing)
            total = total + c.iael_weight * iael
        parts.update(msel=msel, iael=iael, total=total)
        return total, {k: v.detach() for k, v in parts.items()}
