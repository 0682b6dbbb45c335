"""Shared test helpers (imported as `from conftest import ...`): small model configs, deterministic inputs,
comparisons and parameter grouping."""
from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

if not torch.cuda.is_available():  # Triton chooses the interpreter when it is first imported: before any test
    os.environ["TRITON_INTERPRET"] = "1"

from mip_dist.config import load_config
from mip_dist.model import build_model, param_category

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Sizes the ablation configs (ViT-B) down to a 64-wide, 4-block model at 64x32 (5x2 patches).
SMALL = ["model.embed_dim=64", "model.depth=4", "model.num_heads=4", "model.img_size=[64,32]",
         "data.img_size=[64,32]", "model.num_modality_prompts=3", "model.num_instance_prompts=2",
         "model.ipg_fusion_bank=5", "model.pretrained=", "data.batch_size=16", "data.num_instances=2"]
NO_NOISE = ["model.drop_path=0.0", "model.prompt_dropout=0.0", "model.drop_rate=0.0"]
NUM_CLASSES = 7
NUM_CAMERAS = 3


def small_cfg(name: str, extra: list[str] | None = None):
    """A shipped config sized down (tiny.yaml is already small and keeps its own sizes)."""
    overrides = [] if name == "tiny.yaml" else list(SMALL)
    return load_config(CONFIGS / name, overrides + (extra or []))


def make_model(cfg, impl: str = "torch", seed: int = 0):
    """The config's model with seeded weights and the given attention impl."""
    torch.manual_seed(seed)
    return build_model(cfg.model, cfg.attention.__class__(impl=impl), NUM_CLASSES, NUM_CAMERAS)


def inputs(cfg, modality: list[int], seed: int = 1):
    """Images, modality and 0-based camera labels for a batch with the given modalities."""
    g = torch.Generator().manual_seed(seed)
    B = len(modality)
    images = torch.randn(B, 3, *cfg.model.img_size, generator=g)
    cams = torch.randint(0, NUM_CAMERAS, (B,), generator=g)
    return images, torch.tensor(modality), cams


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (0 when both are zero)."""
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff if denom == 0 else diff / denom


def output_tensors(out) -> dict[str, torch.Tensor]:
    """Every tensor of a MIPOutput, named."""
    named = {"global": out.global_feat}
    if out.local_feats is not None:
        named["local"] = out.local_feats
    for group in ("bn_feats", "logits", "prompt_logits", "instance_prompts"):
        for i, t in enumerate(getattr(out, group)):
            named[f"{group}.{i}"] = t
    return named


def params_by_category(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The model's named parameters grouped by `param_category` (every category present, possibly empty)."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {k: [] for k in ("backbone", "prompt", "ipg", "head")}
    for name, p in model.named_parameters():
        groups[param_category(name)].append((name, p))
    return groups



def take_batches(stream, n=None) -> list:
    """The next n batches of a stream (all of its current epoch when n is None)."""
    out = []
    for b in stream:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def same_batches(a: list, b: list) -> bool:
    """Two batch lists equal in every tensor and list (images, labels, keys)."""
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]
                                    for x, y in zip(a, b) for k in x)


def run_probe(source: str, folder: Path, overrides: list[str], timeout: int = 300) -> object:
    """Run a probe script in its own process (a fresh DeepSpeed/process group) with tests/ importable;
    returns the JSON it prints last."""
    import json
    import subprocess
    import sys

    script = folder / "probe.py"
    script.write_text(source)
    repo = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(p for p in (str(repo / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    r = subprocess.run([sys.executable, str(script), json.dumps(overrides)], cwd=repo, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": path})
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def load_launch_script(name: str, alias: str = "") -> object:
    """launch/<name>.py as a module (entry points are scripts, not package modules); `alias` names the module
    when a test file wants its own copy (module-level state such as parsed defaults stays apart)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "launch" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(alias or f"launch_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flip_inside_largest_tensor(file: Path) -> None:
    """Flip one byte in the middle of the zip's largest tensor record: headers, sizes and pickle intact."""
    with zipfile.ZipFile(file) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(file, "rb") as f:  # the local header is 30 bytes + name + extra before the record's data
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack("<HH", f.read(4))
    at = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data = bytearray(file.read_bytes())
    data[at] ^= 0x10
    file.write_bytes(bytes(data))
