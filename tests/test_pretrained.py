"""Loading timm ViT checkpoints created here (.pth, wrappers, .safetensors, .npz) into MIP by name."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mip_dist.model import load_pretrained
from mip_dist.model import param_category

from conftest import inputs, make_model, rel_err, small_cfg

# vit_tiny_patch16_224 geometry (192 wide, 12 blocks, 3 heads) at 128x64 -> 10x5 overlapping patches
VIT_TINY = ["model.embed_dim=192", "model.num_heads=3", "model.depth=12", "model.img_size=[128,64]",
            "data.img_size=[128,64]"]


@pytest.fixture(scope="module")
def timm_sd():
    torch.manual_seed(123)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    return {k: v.detach().clone() for k, v in vit.state_dict().items()}


@pytest.fixture(scope="module")
def model_cfg():
    return small_cfg("ablation_mpl_ipg_iael.yaml", VIT_TINY)


@pytest.fixture(scope="module")
def ref_backbone(tmp_path_factory, timm_sd, model_cfg):
    """Backbone tensors after loading the plain .pth: what every other format must reproduce."""
    path = tmp_path_factory.mktemp("ref") / "plain.pth"
    torch.save(timm_sd, path)
    model, _, _ = _loaded(model_cfg, path)
    return {k: v for k, v in model.state_dict().items() if param_category(k) == "backbone" and k != "sie_embed"}


def _loaded(model_cfg, path):
    model = make_model(model_cfg, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, str(path))
    return model, before, report


def test_pth_loads_resizes_and_copies_into_jpm(tmp_path, timm_sd, model_cfg):
    path = tmp_path / "vit_tiny.pth"
    torch.save(timm_sd, path)
    model, before, report = _loaded(model_cfg, path)
    sd = model.state_dict()
    for k in ("patch_embed.proj.weight", "cls_token", "blocks.0.attn.qkv.weight", "blocks.10.mlp.fc2.weight"):
        assert not torch.equal(sd[k], before[k]) and torch.equal(sd[k], timm_sd[k]), k
    # b1 and b2 both become the checkpoint's last block (11) and final norm
    for branch in ("b1", "b2"):
        for name in ("norm1.weight", "attn.qkv.weight", "attn.proj.bias", "mlp.fc1.weight"):
            assert torch.equal(sd[f"{branch}.block.{name}"], timm_sd[f"blocks.11.{name}"])
        assert torch.equal(sd[f"{branch}.norm.weight"], timm_sd["norm.weight"])
    # position embedding 14x14 -> 10x5, bilinear without antialias, CLS position kept
    old = timm_sd["pos_embed"]
    assert sd["pos_embed"].shape == (1, 51, 192)
    grid = old[:, 1:].reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(10, 5), mode="bilinear", align_corners=False)
    torch.testing.assert_close(sd["pos_embed"][:, 1:], resized.permute(0, 2, 3, 1).reshape(1, 50, 192))
    assert torch.equal(sd["pos_embed"][:, 0], old[:, 0])
    assert any(r.startswith("pos_embed") for r in report["resized"])
    assert {"head.weight", "head.bias"} <= set(report["unexpected"])
    assert not [k for k in report["unexpected"] if k.startswith("blocks.")]
    assert "mpl.bank" in report["missing"] and "sie_embed" in report["missing"]
    assert "ipg.queries" in report["missing"] and "heads.0.bn.weight" in report["missing"]
    assert not [k for k in report["missing"] if k.startswith(("blocks.", "b1.", "b2.", "patch_embed"))]
    assert set(report["missing"]) == {k for k in sd if param_category(k) != "backbone"
                                      or k == "sie_embed"}
    # still a working model whose two attention forms agree
    model.eval()
    images, mod, cam = inputs(model_cfg, [0, 1])
    with torch.no_grad():
        exact = model.extract(images, mod, cam)
        model.attention_impl = "concat"
        assert rel_err(exact, model.extract(images, mod, cam)) <= 1e-5


@pytest.mark.parametrize("fmt", ["model", "state_dict", "module", "safetensors"])
def test_wrapped_pth_and_safetensors_match_plain(tmp_path, timm_sd, model_cfg, ref_backbone, fmt):
    if fmt == "safetensors":
        path = tmp_path / "vit_tiny.safetensors"
        save_file(timm_sd, str(path))
    else:
        path = tmp_path / "wrapped.pt"
        obj = ({f"module.{k}": v for k, v in timm_sd.items()} if fmt == "module"
               else {fmt: timm_sd, "epoch": torch.tensor(3)})
        torch.save(obj, path)
    model, _, report = _loaded(model_cfg, path)
    sd = model.state_dict()
    for k, v in ref_backbone.items():
        assert torch.equal(sd[k], v), k
    assert any(r.startswith("pos_embed") for r in report["resized"])


def _to_npz(sd: dict, path, heads: int) -> None:
    """Write a timm ViT state dict in the Google/JAX .npz layout that timm's _load_weights reads."""
    n = lambda t: t.detach().numpy()  # noqa: E731
    C = sd["cls_token"].shape[-1]
    D = C // heads
    w = {"embedding/kernel": n(sd["patch_embed.proj.weight"].permute(2, 3, 1, 0)),
         "embedding/bias": n(sd["patch_embed.proj.bias"]), "cls": n(sd["cls_token"]),
         "Transformer/posembed_input/pos_embedding": n(sd["pos_embed"]),
         "Transformer/encoder_norm/scale": n(sd["norm.weight"]), "Transformer/encoder_norm/bias": n(sd["norm.bias"]),
         "head/kernel": n(sd["head.weight"].t()), "head/bias": n(sd["head.bias"])}
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        for j, part in enumerate(("query", "key", "value")):
            wq = sd[b + "attn.qkv.weight"][j * C:(j + 1) * C]
            w[f"{mha}{part}/kernel"] = n(wq.t().reshape(C, heads, D))
            w[f"{mha}{part}/bias"] = n(sd[b + "attn.qkv.bias"][j * C:(j + 1) * C].reshape(heads, D))
        w[mha + "out/kernel"] = n(sd[b + "attn.proj.weight"].reshape(C, heads, D).permute(1, 2, 0))
        w[mha + "out/bias"] = n(sd[b + "attn.proj.bias"])
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[f"{p}{ln}/scale"], w[f"{p}{ln}/bias"] = n(sd[b + name + ".weight"]), n(sd[b + name + ".bias"])
        for r in range(2):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"] = n(sd[f"{b}mlp.fc{r + 1}.weight"].t())
            w[f"{p}MlpBlock_3/Dense_{r}/bias"] = n(sd[f"{b}mlp.fc{r + 1}.bias"])
        i += 1
    np.savez(path, **w)


def test_npz_matches_pth(tmp_path, timm_sd, model_cfg, ref_backbone):
    npz = tmp_path / "vit_tiny.npz"
    _to_npz(timm_sd, npz, heads=3)
    model, before, report = _loaded(model_cfg, npz)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    sd = model.state_dict()
    for k, v in ref_backbone.items():
        torch.testing.assert_close(sd[k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert any(r.startswith("pos_embed") for r in report["resized"])


def test_method_and_smaller_depth_checkpoint(tmp_path):
    """A depth-4 model takes b1/b2 from ITS last block index (3); deeper checkpoint blocks are unexpected."""
    cfg = small_cfg("tiny.yaml")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, embed_dim=128, num_heads=4, depth=6)
    sd = vit.state_dict()
    path = tmp_path / "vit_d6.pth"
    torch.save(sd, path)
    model = make_model(cfg)
    report = model.load_pretrained(str(path))
    assert torch.equal(model.b1.block.attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    assert torch.equal(model.b2.block.mlp.fc2.weight, sd["blocks.3.mlp.fc2.weight"])
    assert {"blocks.4.norm1.weight", "blocks.5.mlp.fc1.bias"} <= set(report["unexpected"])
    assert model.pos_embed.shape == (1, 51, 128)


def test_errors_name_the_problem(tmp_path, timm_sd):
    model = make_model(small_cfg("tiny.yaml"))  # 128 wide: the 192-wide checkpoint does not fit
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, str(tmp_path / "nope.pth"))
    path = tmp_path / "vit_tiny.pth"
    torch.save(timm_sd, path)
    with pytest.raises(ValueError, match="cls_token"):
        load_pretrained(model, str(path))
    bad = tmp_path / "weights.ckpt"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown extension"):
        load_pretrained(model, str(bad))
    junk = tmp_path / "junk.pth"
    torch.save({"foo": {"bar": 1}}, junk)
    with pytest.raises(ValueError, match="state dict"):
        load_pretrained(model, str(junk))


def test_base_size_checkpoint_resizes_14x14_to_21x10(tmp_path):
    """The real geometry: a ViT-B/16 224 checkpoint into the paper's 256x128, stride-12 MIP."""
    from mip_dist.config import load_config
    from conftest import CONFIGS

    torch.manual_seed(0)
    sd = timm.create_model("vit_base_patch16_224", pretrained=False).state_dict()
    path = tmp_path / "vit_base.safetensors"
    save_file(sd, str(path))
    model = make_model(load_config(CONFIGS / "mip_vitb16_sysu.yaml", ["model.pretrained="]))
    report = model.load_pretrained(str(path))
    assert report["resized"] == ["pos_embed: (1, 197, 768) -> (1, 211, 768)"]
    assert torch.equal(model.patch_embed.proj.weight, sd["patch_embed.proj.weight"])  # 16x16 kernel as is
    assert torch.equal(model.b1.block.attn.qkv.weight, sd["blocks.11.attn.qkv.weight"])
    assert torch.equal(model.blocks[10].mlp.fc1.weight, sd["blocks.10.mlp.fc1.weight"])
