"""Config loading: YAML layers, dotted overrides, and errors that name the key."""
from pathlib import Path

import pytest

from mip_dist.config import Config, ConfigError, from_dict, load_config, save_config, to_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
TINY = Path(__file__).parent.parent / "configs" / "tiny.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_base_inheritance_and_overrides():
    cfg = load_config("configs/mip_vitb16_regdb.yaml", ["optim.lr=0.002", "data.workers=3", "model.jpm=false"])
    assert cfg.data.dataset == "regdb"  # from the child file
    assert cfg.model.embed_dim == 768  # from the base file
    assert cfg.optim.lr == 0.002 and cfg.data.workers == 3 and cfg.model.jpm is False


def test_override_keeps_types():
    cfg = load_config(None, ["data.img_size=[128,64]", "model.img_size=[128,64]", "optim.lr=1e-3",
                             "loss.triplet_margin=0.3", "eval.protocols=[sysu,regdb]"])
    assert cfg.data.img_size == (128, 64)
    assert isinstance(cfg.optim.lr, float) and cfg.loss.triplet_margin == 0.3
    assert cfg.eval.protocols == ["sysu", "regdb"]


@pytest.mark.parametrize("override, key", [
    ("model.embd_dim=3", "model.embd_dim"),
    ("trainer.epochs=3", "trainer"),
    ("train.epochs=three", "train.epochs"),
    ("train.precision=fp8", "train.precision"),
    ("model.jpm=1", "model.jpm"),
    ("data.batch_size=60", "data.batch_size"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("model.num_heads=5", "model.embed_dim"),
    ("eval.protocols=[market]", "eval.protocols"),
    ("attention.impl=flash", "attention.impl"),
    ("data.img_size=[1,2,3]", "data.img_size"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_batch_must_split_into_identities_and_modalities():
    with pytest.raises(ConfigError, match="P identities x 2K"):
        load_config(None, ["data.batch_size=36", "data.num_instances=4"])
    assert load_config(None, ["data.batch_size=40", "data.num_instances=4"]).data.num_identities == 5


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_round_trip(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["train.seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_triton_head_dim_limits_apply_only_to_impl_triton():
    """A head dim the kernels do not take is refused for attention.impl=triton only: auto and torch run
    it through the PyTorch path (the model builds and matches the literal concatenation)."""
    import torch

    from mip_dist.model import build_model

    odd = ["model.embed_dim=96", "model.num_heads=2"]  # head dim 48
    with pytest.raises(ConfigError, match="head dim 48 must be one of 16, 32, 64, 128 with attention.impl=triton"):
        load_config(TINY, odd + ["attention.impl=triton"])
    cfg = load_config(TINY, odd + ["attention.impl=auto", "model.drop_path=0.0",
                                                    "model.prompt_dropout=0.0"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention, 5, 3).eval()
    images, modality, camera = torch.randn(2, 3, *cfg.model.img_size), torch.tensor([0, 1]), torch.tensor([0, 2])
    with torch.no_grad():
        auto = model.extract(images, modality, camera)
        model.attention_impl = "concat"
        concat = model.extract(images, modality, camera)
    torch.testing.assert_close(auto, concat, rtol=1e-4, atol=1e-5)
