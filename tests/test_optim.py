"""Parameter groups (LR factors, weight decay, frozen backbone) and the warm-up + cosine-restart schedule."""
import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from mip_dist.config import load_config
from mip_dist.engine.optim import (build_optimizer, build_param_groups, freeze_backbone, lr_multiplier,
                                   set_lr)
from mip_dist.model import build_model, param_category

SMALL = ["model.depth=4", "model.embed_dim=64", "model.img_size=[64,32]", "data.img_size=[64,32]"]


def _model_and_cfg(extra=()):
    cfg = load_config("configs/tiny.yaml", SMALL + ["optim.lr=0.1", "optim.bias_lr_factor=3",
                                                    "optim.prompt_lr_factor=7", "optim.ipg_lr_factor=11",
                                                    "optim.weight_decay=0.01", *extra])
    torch.manual_seed(0)
    return build_model(cfg.model, cfg.attention, num_classes=10, num_cameras=6), cfg


def _group_of(groups):
    return {id(p): g for g in groups for p in g["params"]}


def test_groups_follow_configured_factors_and_decay():
    model, cfg = _model_and_cfg()
    groups = build_param_groups(model.named_parameters(), cfg.optim, param_category)
    by_id = _group_of(groups)
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    assert sorted(id(params[n]) for n in trainable) == sorted(by_id), "each trainable param in exactly one group"
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    assert all(g["params"] for g in groups)

    def lr_wd(name):
        g = by_id[id(params[name])]
        assert g["lr"] == g["initial_lr"]
        return round(g["lr"], 10), g["weight_decay"]

    assert lr_wd("mpl.bank") == (0.7, 0.0)  # modality prompts: x7, no decay
    assert lr_wd("mpl.proj.weight") == (0.7, 0.01)
    assert lr_wd("ipg.queries") == (1.1, 0.0)  # IPG: x11, learnable tokens without decay
    assert lr_wd("ipg.block.attn.qkv.weight") == (1.1, 0.01)
    assert lr_wd("ipg.block.attn.qkv.bias") == (1.1, 0.0)
    assert lr_wd("blocks.0.attn.qkv.weight") == (0.1, 0.01)
    assert lr_wd("blocks.0.attn.qkv.bias") == (0.3, 0.0)  # bias: x3, no decay
    assert lr_wd("blocks.0.norm1.weight") == (0.1, 0.0)  # norm: no decay
    assert lr_wd("patch_embed.proj.weight") == (0.1, 0.01)
    head = next(n for n in trainable if param_category(n) == "head" and n.endswith("classifier.weight"))
    assert lr_wd(head) == (0.1, 0.01)
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert all(id(params[n]) not in by_id for n in frozen)


def test_freeze_backbone_keeps_only_prompt_ipg_head_groups():
    model, cfg = _model_and_cfg(["optim.freeze_backbone=true"])
    n_frozen = freeze_backbone(model, param_category)
    assert n_frozen == sum(p.numel() for n, p in model.named_parameters() if param_category(n) == "backbone")
    groups = build_param_groups(model.named_parameters(), cfg.optim, param_category)
    names = {id(p): n for n, p in model.named_parameters()}
    cats = {param_category(names[id(p)]) for g in groups for p in g["params"]}
    assert cats == {"prompt", "ipg", "head"}
    assert all(g["params"] for g in groups)  # no empty (or frozen-only) group reaches ZeRO
    opt = build_optimizer(groups, cfg.optim)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == cfg.optim.momentum


def test_everything_frozen_is_an_error():
    model, cfg = _model_and_cfg()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_param_groups(model.named_parameters(), cfg.optim, param_category)


def test_adamw_option():
    model, cfg = _model_and_cfg(["optim.name=adamw"])
    opt = build_optimizer(build_param_groups(model.named_parameters(), cfg.optim, param_category), cfg.optim)
    assert isinstance(opt, torch.optim.AdamW)


def test_schedule_matches_timm_cosine_with_restarts():
    cfg = load_config(None).optim  # paper: 5 warm-up epochs from 0.01, restarts every 30 (x0.1), min 1e-5
    sched = CosineLRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                              t_initial=int(cfg.restart_epochs), lr_min=cfg.min_lr_factor,
                              cycle_decay=cfg.restart_decay, cycle_limit=100, warmup_t=int(cfg.warmup_epochs),
                              warmup_lr_init=cfg.warmup_factor, t_in_epochs=True)
    for e in [0, 0.5, 1, 2.25, 4.9, 5, 6.3, 17, 29.99, 30, 31.5, 45, 59.5, 60, 70, 79.9]:
        assert lr_multiplier(e, cfg) == pytest.approx(sched._get_lr(e)[0], rel=1e-9, abs=1e-12), e


def test_schedule_key_points():
    cfg = load_config(None).optim
    assert lr_multiplier(0, cfg) == pytest.approx(cfg.warmup_factor)
    assert lr_multiplier(30, cfg) == pytest.approx(cfg.restart_decay)  # second cycle's peak
    assert lr_multiplier(60, cfg) == pytest.approx(cfg.restart_decay ** 2)
    assert lr_multiplier(30 - 1e-6, cfg) == pytest.approx(cfg.min_lr_factor, abs=1e-9)
    values = [lr_multiplier(e / 10, cfg) for e in range(800)]
    assert min(values) >= cfg.min_lr_factor - 1e-15 and max(values) <= 1.0
    assert all(b > a for a, b in zip(values[:49], values[1:50]))  # warm-up rises (epochs 0-4.9)


def test_set_lr_scales_every_group_per_step():
    model, cfg = _model_and_cfg()
    opt = build_optimizer(build_param_groups(model.named_parameters(), cfg.optim, param_category), cfg.optim)
    steps_per_epoch = 4
    for step in (0, 3, 9):
        mult = set_lr(opt, step, steps_per_epoch, cfg.optim)
        assert mult == pytest.approx(lr_multiplier(step / steps_per_epoch, cfg.optim))
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(g["initial_lr"] * mult)
            assert math.isclose(g["initial_lr"], cfg.optim.lr * g["lr_factor"])
