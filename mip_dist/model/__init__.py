"""The MIP model: prompted ReID ViT on timm parts, MPL, IPG, JPM and heads."""
from .block import PromptedBlock
from .mip import MIP, MIPOutput, build_model
from .param_groups import param_category
from .mpl import MODALITY_INFRARED, MODALITY_VISIBLE
from .pretrained import load_pretrained
from .release import from_release_checkpoint, is_release_checkpoint

__all__ = ["MIP", "MIPOutput", "PromptedBlock", "build_model", "from_release_checkpoint",
           "is_release_checkpoint", "load_pretrained", "param_category",
           "MODALITY_INFRARED", "MODALITY_VISIBLE"]
