"""The LR / freeze group of each MIP parameter, by name: what the optimizer and prompt tuning group on."""
from __future__ import annotations


def param_category(name: str) -> str:
    """LR/freeze group of a parameter name: 'prompt' (mpl.), 'ipg' (ipg.), 'head' (heads., iael_heads.) or 'backbone'."""
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        while name.startswith(prefix):
            name = name[len(prefix):]
    if name.startswith("mpl."):
        return "prompt"
    if name.startswith("ipg."):
        return "ipg"
    if name.startswith(("heads.", "iael_heads.")):
        return "head"
    return "backbone"
