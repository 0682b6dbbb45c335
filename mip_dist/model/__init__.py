"""The MIP model: prompted ReID ViT on timm parts, MPL, IPG, JPM and heads."""
