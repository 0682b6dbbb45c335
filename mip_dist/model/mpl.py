"""MPL: per-modality, per-layer prompt banks with a shared projection (applied once per step to the bank)."""
from __future__ import annotations

import math

import torch
from torch import nn

from mip_dist.data.records import INFRARED as MODALITY_INFRARED  # noqa: F401  (one definition, re-exported)
from mip_dist.data.records import VISIBLE as MODALITY_VISIBLE  # noqa: F401


def prompt_init_bound(patch_size: int, embed_dim: int) -> float:
    """The paper's uniform init bound sqrt(6 / (3*p*p + C)) * 20 (= 1.25 for ViT-B/16)."""
    return math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim)) * 20.0


class ModalityPrompts(nn.Module):
    """Bank [2, L, Pm, C] (0 = infrared, 1 = visible) -> Dropout(Linear(bank)), shared by every sample."""

    def __init__(self, num_layers: int, num_prompts: int, embed_dim: int, patch_size: int, dropout: float) -> None:
        super().__init__()
        self.bound = prompt_init_bound(patch_size, embed_dim)
        self.bank = nn.Parameter(torch.empty(2, num_layers, num_prompts, embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.drop = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self) -> None:
        """Paper's uniform bank init; VPT's kaiming (fan_out) projection."""
        nn.init.uniform_(self.bank, -self.bound, self.bound)
        nn.init.kaiming_normal_(self.proj.weight, a=0, mode="fan_out")
        nn.init.zeros_(self.proj.bias)

    def forward(self) -> torch.Tensor:
        """Projected bank [2, L, Pm, C]; one dropout mask per step, shared by all samples reading an entry."""
        return self.drop(self.proj(self.bank))
