"""Token embeddings: TransReID's overlapping patch embedding, or a convolutional stem for training from scratch."""
from __future__ import annotations

import timm
import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer_hybrid import ConvStem
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


class ConvStemEmbed(nn.Module):
    """Image -> [B, Hp*Wp, C] tokens through timm's ConvStem (stride-2 3x3 conv-BN-ReLU layers, last one linear).

    Why: a ViT trained from scratch on a few thousand images (the embedded demo) learns textures and
    shapes that transfer across modalities far sooner behind a convolutional stem (Xiao et al., "Early
    convolutions help transformers see better", 2021); with a pretrained ViT keep the patch embedding.
    """

    def __init__(self, img_size: tuple[int, int], depth: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"model.stem_depth must be >= 1; got {depth}")
        self.img_size = (int(img_size[0]), int(img_size[1]))
        reduction = 2 ** depth
        if self.img_size[0] % reduction or self.img_size[1] % reduction:
            raise ValueError(f"model.img_size {self.img_size} must be divisible by 2**model.stem_depth = {reduction}")
        self.grid_size = (self.img_size[0] // reduction, self.img_size[1] // reduction)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        channels = tuple(max(embed_dim // 2 ** (depth - 1 - i), 16) for i in range(depth - 1)) + (embed_dim,)
        self.proj = ConvStem(in_chans, depth=depth, channels=channels, kernel_size=3, stride=(2,) * depth, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} differs from model.img_size {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class HybridStemEmbed(nn.Module):
    """Image -> [B, Hp*Wp, C] tokens: a randomly initialised timm CNN's next-to-last feature map, projected by a 1x1 conv.

    Why: timm's hybrid ViT embedding (the R50+ViT-B/16 recipe) gives a ViT trained from scratch on a few
    thousand images the convolutional bias it needs to find modality-shared shapes and textures.
    """

    def __init__(self, img_size: tuple[int, int], backbone: str, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size = (int(img_size[0]), int(img_size[1]))
        try:
            cnn = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(-2,), in_chans=in_chans)
        except RuntimeError as err:
            raise ValueError(f"model.stem_backbone {backbone!r} is not a timm model with features_only support") from err
        self.embed = HybridEmbed(cnn, img_size=self.img_size, patch_size=1, in_chans=in_chans, embed_dim=embed_dim)
        self.grid_size = tuple(self.embed.grid_size)
        self.num_patches = self.embed.num_patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} differs from model.img_size {self.img_size}")
        return self.embed(x)
