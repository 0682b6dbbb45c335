"""JPM (TransReID): a copied final block + norm, and the shift / shuffle / split of patch tokens."""
from __future__ import annotations

import torch
from torch import nn

from .block import PromptedBlock

Tensor = torch.Tensor


class FinalBlock(nn.Module):
    """A backbone block followed by its own LayerNorm (TransReID's b1 / b2)."""

    def __init__(self, block: PromptedBlock, norm: nn.Module) -> None:
        super().__init__()
        self.block = block
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.block(x))


def shuffle_unit(tokens: Tensor, shift: int, groups: int) -> Tensor:
    """TransReID's shuffle_unit on [CLS, patches] -> shuffled patches [B, Np', C].

    Shift: TransReID indexes the full sequence (CLS included), so the patches are rotated left by
    `shift - 1` (4 for shift=5). Shuffle: view as `groups` groups and interleave them; when the patch
    count is not divisible, the second-to-last patch is repeated to fill (TransReID's padding).
    """
    patches = tokens[:, 1:]
    B, n, C = patches.shape
    r = max(shift - 1, 0) % n
    x = torch.cat([patches[:, r:], patches[:, :r]], dim=1)
    pad = (-n) % groups
    if pad:
        x = torch.cat([x, x[:, -2:-1].expand(B, pad, C)], dim=1)
    return x.view(B, groups, -1, C).transpose(1, 2).reshape(B, -1, C)


def split_parts(tokens: Tensor, shuffled: Tensor, num_parts: int) -> Tensor:
    """[B*P, 1 + L, C]: CLS + part i = shuffled[:, i*L:(i+1)*L] with L = Np // P (remainder dropped, as TransReID)."""
    B, n1, C = tokens.shape
    length = (n1 - 1) // num_parts
    parts = shuffled[:, : num_parts * length].reshape(B, num_parts, length, C)
    cls = tokens[:, :1].unsqueeze(1).expand(B, num_parts, 1, C)
    return torch.cat([cls, parts], dim=2).reshape(B * num_parts, 1 + length, C)
