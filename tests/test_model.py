"""MIP structure and shapes: timm layout, prompts, JPM, heads, extract, cls_attention, parameter groups."""
from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer

from mip_dist.config import load_config
from mip_dist.model import MIP, MIPOutput, build_model, param_category
from mip_dist.model.jpm import shuffle_unit, split_parts
from mip_dist.model.mpl import prompt_init_bound

from conftest import CONFIGS, NUM_CAMERAS, NUM_CLASSES, inputs, make_model, params_by_category, small_cfg


def test_tiny_shapes_and_output_type():
    cfg = load_config(CONFIGS / "tiny.yaml")
    model = make_model(cfg).eval()
    images, mod, cam = inputs(cfg, [0, 1, 1])
    out = model(images, mod, cam)
    C, P, L = cfg.model.embed_dim, cfg.model.num_parts, cfg.model.num_prompted_layers
    assert isinstance(out, MIPOutput)
    assert out.global_feat.shape == (3, C) and out.local_feats.shape == (3, P, C)
    assert len(out.bn_feats) == len(out.logits) == 1 + P
    assert all(lg.shape == (3, NUM_CLASSES) for lg in out.logits)
    assert len(out.prompt_logits) == len(out.instance_prompts) == L == 2
    assert all(t.shape == (3, C) for t in out.instance_prompts)
    feat = model.extract(images, mod, cam)
    assert feat.shape == (3, C * (1 + P))
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(3))
    expected = torch.cat([out.global_feat, out.local_feats.flatten(1) / P], 1)
    torch.testing.assert_close(feat, torch.nn.functional.normalize(expected, dim=1))


def test_base_config_shapes():
    cfg = load_config(CONFIGS / "mip_vitb16_sysu.yaml", ["model.pretrained="])
    model = make_model(cfg).eval()
    assert model.grid_size == (21, 10) and model.pos_embed.shape == (1, 211, 768)
    assert len(model.blocks) == 11 and model.num_prompted == 10
    assert model.mpl.bank.shape == (2, 10, 16, 768)
    assert model.mpl.bound == pytest.approx(1.25) and model.mpl.bank.abs().max() <= 1.25
    assert model.mpl.bank.abs().max() > 1.2  # uniform over the whole range
    images, mod, cam = inputs(cfg, [1])
    with torch.no_grad():
        out = model(images, mod, cam)
        feat = model.extract(images, mod, cam)
    assert out.global_feat.shape == (1, 768) and out.local_feats.shape == (1, 4, 768)
    assert feat.shape == (1, 3840)
    assert len(out.prompt_logits) == 10 and out.prompt_logits[0].shape == (1, NUM_CLASSES)


def test_blocks_are_timm_blocks_with_timm_names():
    cfg = small_cfg("ablation_baseline.yaml", ["model.jpm=false"])
    model = make_model(cfg)
    assert all(isinstance(b, Block) for b in model.blocks)
    vit = VisionTransformer(img_size=cfg.model.img_size, patch_size=16, embed_dim=64, depth=4, num_heads=4,
                            num_classes=0)
    ours = set(model.state_dict())
    assert set(vit.state_dict()) <= ours, set(vit.state_dict()) - ours


def test_plain_model_equals_timm_vit_when_stride_equals_patch():
    """No prompts, no SIE, no JPM, stride 16: the backbone is exactly timm's VisionTransformer."""
    cfg = small_cfg("ablation_baseline.yaml", ["model.jpm=false", "model.sie=false", "model.stride=16"])
    model = make_model(cfg).eval()
    vit = VisionTransformer(img_size=cfg.model.img_size, patch_size=16, embed_dim=64, depth=4, num_heads=4,
                            num_classes=0).eval()
    missing, unexpected = vit.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    images, mod, cam = inputs(cfg, [0, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(images, mod, cam).global_feat, vit.forward_features(images)[:, 0])


def test_ablation_groups_are_absent_when_off():
    base = make_model(small_cfg("ablation_baseline.yaml"))
    assert base.mpl is None and base.ipg is None and base.iael_heads is None and base.num_prompted == 0
    mpl = make_model(small_cfg("ablation_mpl.yaml"))
    assert mpl.mpl is not None and mpl.ipg is None and mpl.iael_heads is None
    ipg = make_model(small_cfg("ablation_mpl_ipg.yaml"))
    assert ipg.ipg is not None and ipg.iael_heads is None
    full = make_model(small_cfg("ablation_mpl_ipg_iael.yaml"))
    assert len(full.iael_heads) == full.num_prompted == 2
    images, mod, cam = inputs(small_cfg("ablation_baseline.yaml"), [0, 1])
    out = base.eval()(images, mod, cam)
    assert out.prompt_logits == [] and out.instance_prompts == []


def test_no_jpm_gives_global_only():
    cfg = small_cfg("ablation_mpl_ipg_iael.yaml", ["model.jpm=false"])
    model = make_model(cfg).eval()
    assert model.b1 is None and len(model.blocks) == cfg.model.depth and len(model.heads) == 1
    images, mod, cam = inputs(cfg, [0, 1])
    out = model(images, mod, cam)
    assert out.local_feats is None and len(out.logits) == 1
    assert model.extract(images, mod, cam).shape == (2, 64)


def test_jpm_copies_start_equal_and_heads_init():
    model = make_model(small_cfg("ablation_mpl_ipg_iael.yaml"))
    for (n1, p1), (n2, p2) in zip(model.b1.state_dict().items(), model.b2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    for head in list(model.heads) + list(model.iael_heads):
        assert not head.bn.bias.requires_grad and head.classifier.bias is None
        assert head.classifier.weight.std().item() < 0.002
    assert isinstance(model.heads, torch.nn.ModuleList)


def test_shuffle_unit_follows_transreid():
    tokens = torch.arange(11.0).view(1, 11, 1)  # CLS = 0, patches 1..10
    out = shuffle_unit(tokens, shift=5, groups=2).flatten().tolist()
    # TransReID: cat(features[:, 5:], features[:, 1:5]) -> 5..10,1..4; 2 groups interleaved
    assert out == [5, 10, 6, 1, 7, 2, 8, 3, 9, 4]
    odd = shuffle_unit(torch.arange(10.0).view(1, 10, 1), shift=5, groups=2).flatten().tolist()
    assert odd == [5, 1, 6, 2, 7, 3, 8, 4, 9, 3]  # 9 patches: 5..9,1..4 padded with its second-to-last (3)
    parts = split_parts(tokens, shuffle_unit(tokens, 5, 2), num_parts=4)
    assert parts.shape == (4, 3, 1)  # 10 // 4 = 2 patches per part + CLS; remainder dropped
    assert parts[:, 0, 0].tolist() == [0, 0, 0, 0] and parts[1, 1:, 0].tolist() == [6, 1]


def test_modality_bank_is_shared_and_indexed_per_sample():
    """Infrared samples read bank entry 0, visible ones entry 1: swapping the entries swaps the outputs."""
    cfg = small_cfg("ablation_mpl.yaml")
    model = make_model(cfg).eval()
    images, _, cam = inputs(cfg, [0, 0])
    with torch.no_grad():
        ir = model(images, torch.tensor([0, 0]), cam).global_feat
        rgb = model(images, torch.tensor([1, 1]), cam).global_feat
        assert (ir - rgb).abs().max() > 1e-4
        model.mpl.bank.copy_(model.mpl.bank.flip(0))
        torch.testing.assert_close(model(images, torch.tensor([1, 1]), cam).global_feat, ir)
    assert model.mpl().shape == (2, 2, 3, 64)


def test_prompt_init_formula():
    assert prompt_init_bound(16, 768) == pytest.approx((6 / (3 * 16 * 16 + 768)) ** 0.5 * 20)


def test_cls_attention_map():
    cfg = small_cfg("ablation_mpl_ipg_iael.yaml")
    model = make_model(cfg).eval()
    images, mod, cam = inputs(cfg, [0, 1])
    with torch.no_grad():
        att = model.cls_attention(images, mod, cam)
        model.attention_impl = "concat"
        att_concat = model.cls_attention(images, mod, cam)
    assert att.shape == (2, 5, 2)
    assert (att >= 0).all() and (att.sum(dim=(1, 2)) < 1).all()
    torch.testing.assert_close(att, att_concat)
    base = make_model(small_cfg("ablation_baseline.yaml")).eval()
    with torch.no_grad():
        assert base.cls_attention(images, mod, cam).shape == (2, 5, 2)


def test_param_categories():
    model = make_model(small_cfg("ablation_mpl_ipg_iael.yaml"))
    groups = params_by_category(model)
    names = {k: {n for n, _ in v} for k, v in groups.items()}
    assert names["prompt"] == {"mpl.bank", "mpl.proj.weight", "mpl.proj.bias"}
    assert "ipg.queries" in names["ipg"] and "ipg.block.attn.qkv.weight" in names["ipg"]
    assert "iael_heads.0.classifier.weight" in names["head"] and "heads.0.bn.weight" in names["head"]
    assert {"pos_embed", "cls_token", "sie_embed", "b1.block.attn.qkv.weight", "blocks.0.mlp.fc1.weight"} \
        <= names["backbone"]
    assert sum(len(v) for v in groups.values()) == len(list(model.parameters()))
    assert param_category("module.mpl.bank") == "prompt" and param_category("_orig_mod.ipg.x") == "ipg"


def test_bad_labels_and_settings_raise_clear_errors():
    cfg = small_cfg("ablation_mpl_ipg_iael.yaml")
    model = make_model(cfg).eval()
    images, mod, cam = inputs(cfg, [0, 1])
    with pytest.raises(ValueError, match="modality"):
        model(images, torch.tensor([0, 2]), cam)
    with pytest.raises(ValueError, match="0-based"):
        model(images, mod, torch.tensor([0, NUM_CAMERAS]))
    with pytest.raises(ValueError, match="attention.impl"):
        model.attention_impl = "flash"
    with pytest.raises(ValueError, match="attn_drop_rate"):
        make_model(small_cfg("tiny.yaml", ["model.attn_drop_rate=0.1"]), impl="torch")
    make_model(small_cfg("tiny.yaml", ["model.attn_drop_rate=0.1"]), impl="concat")  # literal form can
    with pytest.raises(ValueError, match="num_parts"):
        make_model(small_cfg("tiny.yaml", ["model.num_parts=60"]))


def test_build_model_signature_and_impl():
    cfg = load_config(CONFIGS / "tiny.yaml", ["attention.impl=concat"])
    model = build_model(cfg.model, cfg.attention, num_classes=5, num_cameras=2)
    assert isinstance(model, MIP) and model.attention_impl == "concat"
    assert model.heads[0].classifier.out_features == 5 and model.sie_embed.shape == (2, 1, 128)


@pytest.mark.parametrize("stem, grid", [("conv", (8, 4)), ("hybrid", (8, 4))])
def test_cnn_stems_make_tokens_and_train(stem, grid):
    cfg = load_config(CONFIGS / "tiny.yaml", [f"model.stem={stem}"])
    model = make_model(cfg).train()
    assert model.grid_size == grid and model.pos_embed.shape == (1, 1 + grid[0] * grid[1], cfg.model.embed_dim)
    images, mod, cam = inputs(cfg, [0, 1, 1, 0])
    out = model(images, mod, cam)
    out.logits[0].sum().backward()
    stem_grads = [p.grad for n, p in model.named_parameters() if n.startswith("patch_embed.")]
    assert stem_grads and all(g is not None and g.abs().sum() > 0 for g in stem_grads[:1])
    assert all(param_category(n) == "backbone" for n, _ in model.named_parameters() if n.startswith("patch_embed."))
    feat = model.eval().extract(images, mod, cam)
    assert feat.shape == (4, cfg.model.embed_dim * (1 + cfg.model.num_parts))


def test_conv_stem_layout_follows_strides_and_channels():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.stem=conv", "model.stem_strides=[2,2,1,2,1,2]",
                                              "model.stem_channels=[16,32,32,64,64]"])
    model = make_model(cfg)
    convs = [m for m in model.patch_embed.proj.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride[0] for c in convs] == [2, 2, 1, 2, 1, 2]
    assert [c.out_channels for c in convs] == [16, 32, 32, 64, 64, cfg.model.embed_dim]
    assert model.grid_size == (8, 4)


def test_cnn_stem_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="model.stem_strides"):
        make_model(load_config(CONFIGS / "tiny.yaml", ["model.stem=conv", "model.stem_strides=[2,0,2]"]))
    with pytest.raises(ValueError, match="model.stem_channels: needs 2 widths"):
        make_model(load_config(CONFIGS / "tiny.yaml", ["model.stem=conv", "model.stem_strides=[2,2,2]",
                                                       "model.stem_channels=[32]"]))
    with pytest.raises(ValueError, match="model.img_size"):
        make_model(load_config(CONFIGS / "tiny.yaml", ["model.stem=conv", "model.stem_strides=[2,2,2,2,2,2,2]",
                                                       "model.jpm=false"]))
    with pytest.raises(ValueError, match="model.stem_backbone"):
        make_model(load_config(CONFIGS / "tiny.yaml", ["model.stem=hybrid", "model.stem_backbone=no_such_net"]))


def test_avg_global_pool_is_the_mean_patch_token():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.jpm=false", "model.global_pool=avg"])
    model = make_model(cfg).eval()
    images, mod, cam = inputs(cfg, [0, 1])
    tokens = model.norm(model._trunk(images, mod, cam).tokens)
    out = model(images, mod, cam)
    torch.testing.assert_close(out.global_feat, tokens[:, 1:].mean(1))
    assert not torch.allclose(out.global_feat, tokens[:, 0])


def test_conv_stem_convolves_channels_last_with_the_same_result():
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.stem=conv"])
    embed = make_model(cfg).patch_embed
    seen = []
    embed.proj[0].conv.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    images = torch.randn(2, 3, *cfg.model.img_size)
    tokens = embed(images)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and tokens.is_contiguous()
    nchw = embed.proj(images).flatten(2).transpose(1, 2)  # the stem on the plain layout
    torch.testing.assert_close(tokens, nchw, rtol=1e-4, atol=1e-5)
