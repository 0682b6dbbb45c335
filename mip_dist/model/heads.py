"""BNNeck + bias-free identity classifier (TransReID init)."""
from __future__ import annotations

import torch
from torch import nn


class BNNeckHead(nn.Module):
    """BatchNorm1d with a frozen bias (BNNeck), then a bias-free Linear over the identity classes.

    `train_bias=True` keeps the BN bias trainable: the authors' released IAEL heads do (model.layout=release).
    """

    def __init__(self, dim: int, num_classes: int, train_bias: bool = False) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(train_bias)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        """TransReID's weights_init_kaiming (BN: 1, 0) and weights_init_classifier (std 0.001)."""
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BN feature, logits)."""
        bn = self.bn(feat)
        return bn, self.classifier(bn)
