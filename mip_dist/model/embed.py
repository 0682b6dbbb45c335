"""Token embeddings: TransReID's overlapping patch embedding, or a convolutional stem for training from scratch."""
from __future__ import annotations

import math

import timm
import torch
from timm.layers import HybridEmbed
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from mip_dist.config import ModelConfig


class _TokenEmbed(nn.Module):
    """Image -> [B, Hp*Wp, C] tokens: `proj` maps [B, 3, H, W] to a [B, C, Hp, Wp] map; the image size is checked."""

    proj: nn.Module

    def __init__(self, img_size: tuple[int, int], grid_size: tuple[int, int]) -> None:
        super().__init__()
        self.img_size = (int(img_size[0]), int(img_size[1]))
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"image size {tuple(x.shape[-2:])} differs from model.img_size {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class OverlapPatchEmbed(_TokenEmbed):
    """Tokens from a `patch_size` kernel with a smaller `stride` (TransReID); weights named like timm's."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__(img_size, tuple((int(s) - patch_size) // stride + 1 for s in img_size))
        self.patch_size = (patch_size, patch_size)
        self.stride = (stride, stride)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride)


class ConvStemEmbed(_TokenEmbed):
    """Tokens from timm's ConvStem: one 3x3 conv-BN-ReLU per `strides` entry, the last conv linear.

    Why: a ViT trained from scratch on a few thousand images (the embedded demo) learns textures and
    shapes that transfer across modalities far sooner behind a convolutional stem (Xiao et al., "Early
    convolutions help transformers see better", 2021); with a pretrained ViT keep the patch embedding.
    """

    def __init__(self, img_size: tuple[int, int], strides: tuple[int, ...], channels: tuple[int, ...],
                 in_chans: int, embed_dim: int) -> None:
        reduction = math.prod(strides)  # strides, widths and image size are checked by config.validate
        super().__init__(img_size, (img_size[0] // reduction, img_size[1] // reduction))
        widths = tuple(channels) + (embed_dim,) if channels else embed_dim  # an int: timm's halving tiers
        self.proj = ConvStem(in_chans, depth=len(strides), channels=widths, kernel_size=3, stride=tuple(strides),
                             padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stem convolves channels-last (NHWC): oneDNN and cuDNN then skip a layout reorder of every activation,
        and the tokens come out contiguous. Stem forward+backward 0.9x the time on 2 AVX2 cores (bench_demo --stem)."""
        return super().forward(x.contiguous(memory_format=torch.channels_last))


class HybridStemEmbed(_TokenEmbed):
    """Tokens from a randomly initialised timm CNN's next-to-last feature map, projected by a 1x1 conv.

    Why: timm's hybrid ViT embedding (the R50+ViT-B/16 recipe) gives a ViT trained from scratch on a few
    thousand images the convolutional bias it needs to find modality-shared shapes and textures.
    """

    def __init__(self, img_size: tuple[int, int], backbone: str, in_chans: int, embed_dim: int) -> None:
        try:
            cnn = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(-2,), in_chans=in_chans)
        except RuntimeError as err:
            raise ValueError(f"model.stem_backbone {backbone!r} is not a timm model with features_only support") from err
        proj = HybridEmbed(cnn, img_size=tuple(img_size), patch_size=1, in_chans=in_chans, embed_dim=embed_dim,
                           flatten=False)
        super().__init__(img_size, proj.grid_size)
        self.proj = proj


def build_token_embed(cfg: ModelConfig) -> _TokenEmbed:
    """The token embedding model.stem names (patch: the paper's; conv / hybrid: for training from scratch)."""
    if cfg.stem == "conv":
        return ConvStemEmbed(cfg.img_size, cfg.stem_strides, cfg.stem_channels, 3, cfg.embed_dim)
    if cfg.stem == "hybrid":
        return HybridStemEmbed(cfg.img_size, cfg.stem_backbone, 3, cfg.embed_dim)
    return OverlapPatchEmbed(cfg.img_size, cfg.patch_size, cfg.stride, 3, cfg.embed_dim)
