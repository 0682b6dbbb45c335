"""Overlapping patch embedding (TransReID): a conv whose stride is smaller than its kernel."""
from __future__ import annotations

import torch
from torch import nn


class OverlapPatchEmbed(nn.Module):
    """Image -> [B, Hp*Wp, C] tokens with a `patch_size` kernel and a smaller `stride`; weights named like timm's."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.patch_size = (patch_size, patch_size)
        self.stride = (stride, stride)
        self.grid_size = tuple((s - patch_size) // stride + 1 for s in self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} differs from model.img_size {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)
