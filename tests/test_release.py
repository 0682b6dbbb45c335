"""model.layout=release and the authors' checkpoints: the key mapping, the block-10 skip, errors, conversion.

The "their" state dicts here are built by the tests from our model through the mapping the README
documents (nothing of the authors' code is imported or copied)."""
from __future__ import annotations

import importlib.util
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from mip_dist.config import ConfigError, from_dict, load_config
from mip_dist.engine.export import load_exported
from mip_dist.model import build_model
from mip_dist.model.pretrained import load_pretrained
from mip_dist.model.release import ReleaseCheckpointError, from_release_checkpoint, is_release_checkpoint

from conftest import CONFIGS, NUM_CAMERAS, NUM_CLASSES, inputs, rel_err

ROOT = Path(__file__).resolve().parents[1]
TINY = CONFIGS / "tiny.yaml"
TINY_SIZES = {"img_size": (128, 64), "num_heads": 4}  # what the tensors cannot tell for tiny.yaml


def _load_launch(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses in the script look their module up
    spec.loader.exec_module(mod)
    return mod


def release_model(extra: list[str] | None = None, seed: int = 0, num_classes: int = NUM_CLASSES):
    """A tiny release-layout model playing "their" trained network: zero IPG queries (their released default)."""
    cfg = load_config(TINY, ["model.layout=release", *(extra or [])])
    torch.manual_seed(seed)
    model = build_model(cfg.model, cfg.attention.__class__(impl="torch"), num_classes, NUM_CAMERAS)
    with torch.no_grad():
        model.ipg.queries.zero_()
        for head in [*model.heads, *model.iael_heads]:  # trained-looking BN statistics
            head.bn.running_mean.normal_()
            head.bn.running_var.uniform_(0.5, 2.0)
            head.bn.bias.normal_()
    return cfg, model.eval()


def to_their_naming(model) -> dict[str, torch.Tensor]:
    """Our state dict renamed to the authors' keys (the README's table), plus their tensors ours never reads."""
    depth, L, C = model.cfg.depth, model.num_prompted, model.embed_dim
    g = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.clone()
        head, _, rest = key.partition(".")
        if key == "mpl.bank":  # theirs: layer 0 apart, then [2, depth, Pm, C] of which layers 1..L-1 are read
            out["base.prompt_embeddings"] = value[:, 0]
            deep = torch.randn(2, depth, *value.shape[2:], generator=g)
            deep[:, : L - 1] = value[:, 1:]
            out["base.deep_prompt_embeddings"] = deep
        elif key == "ipg.queries":
            out["base.prompt_embed"] = torch.randn(value.shape, generator=g)  # unused: theirs feeds zeros
        elif head in ("heads", "iael_heads"):
            index, kind, name = rest.split(".", 2)
            if head == "heads":
                stem = ("bottleneck" if kind == "bn" else "classifier") + ("" if index == "0" else f"_{index}")
            else:
                stem = ("bottlenecks" if kind == "bn" else "classifiers") + f"_ins_prompts.{index}"
            out[f"{stem}.{name}"] = value
        elif head in ("b1", "b2"):
            part, name = rest.split(".", 1)
            out[f"{head}.{0 if part == 'block' else 1}.{name}"] = value
        elif key.startswith("mpl.proj."):
            out["base.prompt_proj." + key[len("mpl.proj."):]] = value
        elif key.startswith("ipg.block."):
            out["base.instance_prompt_generator." + key[len("ipg.block."):]] = value
        else:
            out["base." + key] = value
    for name, value in model.b1.block.state_dict().items():  # their last block: source of b1/b2, never run
        out[f"base.blocks.{depth - 1}.{name}"] = torch.randn(value.shape, generator=g)
    out.update({"base.norm.weight": torch.ones(C), "base.norm.bias": torch.zeros(C),
                "base.fc.weight": torch.randn(10, C, generator=g), "base.fc.bias": torch.zeros(10),
                "base.prompt_adapters.0.fc1.weight": torch.randn(64, C, generator=g),
                "zero_token": torch.randn(1, 1, C, generator=g)})
    return out


def _save(sd: dict, path: Path) -> Path:
    torch.save(sd, path)
    return path


def test_layout_setting_defaults_to_paper_and_release_needs_jpm():
    assert load_config(TINY).model.layout == "paper"
    with pytest.raises(ConfigError, match="model.layout: release .*model.jpm=true"):
        load_config(TINY, ["model.layout=release", "model.jpm=false"])
    with pytest.raises(ConfigError, match="model.layout: .*prompted_layers must be -1 or 2"):
        load_config(TINY, ["model.layout=release", "model.prompted_layers=1"])
    for name in ("mip_vitb16_sysu_release.yaml", "mip_vitb16_regdb_release.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.model.layout == "release" and cfg.loss.msel_start_epoch == 9  # their epoch 10, counted from 1


def test_release_skips_block_depth_minus_2_and_paper_runs_it():
    cfg, release = release_model()
    paper_cfg = load_config(TINY)
    paper = build_model(paper_cfg.model, paper_cfg.attention.__class__(impl="torch"), NUM_CLASSES, NUM_CAMERAS).eval()
    paper.load_state_dict(release.state_dict())
    images, mod, cam = inputs(cfg, [0, 1, 1])
    with torch.no_grad():
        before_rel, before_pap = release.extract(images, mod, cam), paper.extract(images, mod, cam)
        assert rel_err(before_rel, before_pap) > 1e-3  # the two layouts are different functions
        for model in (release, paper):
            for p in model.blocks[-1].parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(release.extract(images, mod, cam), before_rel)
        assert rel_err(paper.extract(images, mod, cam), before_pap) > 1e-3


def test_release_training_differences_drop_path_bias_and_frozen_block():
    _, release = release_model(["model.drop_path=0.1"])
    paper_cfg = load_config(TINY, ["model.drop_path=0.1"])
    paper = build_model(paper_cfg.model, paper_cfg.attention, NUM_CLASSES, NUM_CAMERAS)
    assert isinstance(release.ipg.block.drop_path1, torch.nn.Identity)  # theirs: deep copy of block 0 (dpr 0)
    assert not isinstance(paper.ipg.block.drop_path1, torch.nn.Identity)
    assert all(h.bn.bias.requires_grad for h in release.iael_heads)
    assert not any(h.bn.bias.requires_grad for h in paper.iael_heads)
    assert not any(h.bn.bias.requires_grad for h in release.heads)  # BNNeck bias frozen in both
    assert not any(p.requires_grad for p in release.blocks[-1].parameters())
    assert all(p.requires_grad for p in paper.blocks[-1].parameters())
    release.train()
    cfg = load_config(TINY)
    out = release(*inputs(cfg, [0, 1, 0, 1]))
    (out.global_feat.sum() + sum(lg.sum() for lg in out.prompt_logits)).backward()
    assert release.blocks[-2].attn.qkv.weight.grad is not None and release.iael_heads[0].bn.bias.grad is not None


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model"])
def test_their_state_dict_round_trips_with_every_key_accounted_for(tmp_path, caplog, wrap):
    cfg, ours = release_model()
    sd = to_their_naming(ours)
    if wrap == "module":
        sd = {f"module.{k}": v for k, v in sd.items()}
    elif wrap in ("state_dict", "model"):
        sd = {wrap: sd}
    path = _save(sd, tmp_path / "their.pth")
    assert is_release_checkpoint(path)
    with caplog.at_level(logging.INFO, logger="mip_dist.model.release"):
        loaded = from_release_checkpoint(path, **TINY_SIZES)
    assert not loaded.training and loaded.cfg.layout == "release"
    assert loaded.num_classes == NUM_CLASSES and loaded.num_cameras == NUM_CAMERAS
    assert loaded.cfg.num_modality_prompts == 4 and loaded.cfg.num_instance_prompts == 4
    assert loaded.cfg.depth == 4 and loaded.num_prompted == 2 and loaded.cfg.num_parts == 4
    mine, theirs = ours.state_dict(), loaded.state_dict()
    assert set(mine) == set(theirs)
    assert [k for k in mine if not torch.equal(mine[k], theirs[k])] == []
    images, mod, cam = inputs(cfg, [0, 1, 1, 0])
    with torch.no_grad():
        assert rel_err(loaded.extract(images, mod, cam), ours.extract(images, mod, cam)) < 1e-5
    ignored = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    for name in ("base.blocks.3.", "base.norm.", "base.fc.", "base.prompt_adapters.", "zero_token",
                 "base.deep_prompt_embeddings[:, 1:]", "base.prompt_embed"):
        assert sum(name in m for m in ignored) == 1, (name, ignored)


def test_bug_refine_reads_prompt_embed_as_queries(tmp_path):
    cfg, ours = release_model()
    sd = to_their_naming(ours)
    path = _save(sd, tmp_path / "their.pth")
    assert torch.count_nonzero(from_release_checkpoint(path, **TINY_SIZES).ipg.queries) == 0
    refined = from_release_checkpoint(path, bug_refine=True, **TINY_SIZES)
    assert torch.equal(refined.ipg.queries, sd["base.prompt_embed"])


def test_missing_unknown_misshaped_and_unsupported_keys_are_named(tmp_path):
    _, ours = release_model()
    good = to_their_naming(ours)
    cases = {
        "missing key 'b2.0.mlp.fc1.weight'": {k: v for k, v in good.items() if k != "b2.0.mlp.fc1.weight"},
        "unknown key\\(s\\) 'base.surprise'": {**good, "base.surprise": torch.zeros(3)},
        "'base.blocks.1.attn.proj.weight' has shape \\(128, 127\\)":
            {**good, "base.blocks.1.attn.proj.weight": torch.zeros(128, 127)},
        "'base.modal_embed' \\(MODEL.USE_ME": {**good, "base.modal_embed": torch.zeros(2, 1, 128)},
        "missing key 'classifier.weight'": {k: v for k, v in good.items() if k != "classifier.weight"},
        "'base.deep_prompt_embeddings' has shape \\(2, 0, 4, 128\\)":
            {**good, "base.deep_prompt_embeddings": torch.zeros(2, 0, 4, 128)},
        "'base.deep_prompt_embeddings' has shape \\(2, 4, 4, 127\\)":
            {**good, "base.deep_prompt_embeddings": torch.zeros(2, 4, 4, 127)},
        "'base.prompt_embeddings \\+ base.deep_prompt_embeddings' has shape \\(2, 2, 4, 127\\)":
            {**good, "base.prompt_embeddings": torch.zeros(2, 4, 127),
             "base.deep_prompt_embeddings": torch.zeros(2, 4, 4, 127)},
    }
    for i, (message, sd) in enumerate(cases.items()):
        path = _save(sd, tmp_path / f"bad{i}.pth")
        with pytest.raises(ReleaseCheckpointError, match=message):
            from_release_checkpoint(path, **TINY_SIZES)
    with pytest.raises(ReleaseCheckpointError, match="'base.pos_embed' holds 50 patch positions"):
        from_release_checkpoint(_save(good, tmp_path / "size.pth"), num_heads=4)  # default 256x128 does not fit
    with pytest.raises(ReleaseCheckpointError, match="unknown model override"):
        from_release_checkpoint(tmp_path / "size.pth", colour="red")


def test_is_release_checkpoint_rejects_our_exports_and_garbage(tmp_path):
    cfg, ours = release_model()
    torch.save({"model": ours.state_dict(), "config": {}, "num_classes": 7, "num_cameras": 3}, tmp_path / "ours.pt")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert not is_release_checkpoint(tmp_path / "ours.pt")
    assert not is_release_checkpoint(tmp_path / "junk.pth")
    assert not is_release_checkpoint(tmp_path / "absent.pth")
    torch.save(to_their_naming(ours), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert is_release_checkpoint(tmp_path / "legacy.pth")  # not memory-mappable: read in full instead


def test_convert_round_trip_and_fine_tune_start(tmp_path, capsys):
    cfg, ours = release_model()
    their = _save(to_their_naming(ours), tmp_path / "their.pth")
    out = tmp_path / "converted.pt"
    convert = _load_launch("convert_release")
    assert convert.main([str(their), str(out), "--config", str(TINY), "model.layout=release"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert convert.main([str(their), str(out), "--config", str(TINY)]) == 2  # never overwrites
    blob = load_exported(out)
    saved = from_dict(blob["config"])
    assert saved.model.layout == "release" and saved.data.dataset == "synthetic"
    model = build_model(saved.model, saved.attention.__class__(impl="torch"), blob["num_classes"], blob["num_cameras"])
    model.load_state_dict(blob["model"], strict=True)
    images, mod, cam = inputs(cfg, [1, 0, 1])
    with torch.no_grad():
        assert rel_err(model.eval().extract(images, mod, cam), ours.extract(images, mod, cam)) < 1e-5
    fresh = build_model(saved.model, saved.attention, blob["num_classes"], blob["num_cameras"])
    report = load_pretrained(fresh, str(out))  # model.pretrained=converted.pt: fine-tuning starts from it
    assert report["missing"] == [] and report["unexpected"] == []
    assert all(torch.equal(v, blob["model"][k]) for k, v in fresh.state_dict().items())
    other = build_model(saved.model, saved.attention, blob["num_classes"] + 2, blob["num_cameras"])
    report = load_pretrained(other, str(out))  # fine-tuning on another identity set: classifiers start fresh
    assert sorted(report["missing"]) == sorted(k for k in blob["model"] if k.endswith("classifier.weight"))
    assert torch.equal(other.b1.block.attn.qkv.weight, blob["model"]["b1.block.attn.qkv.weight"])


def test_evaluate_prints_a_table_for_a_release_checkpoint(tmp_path, capsys, monkeypatch):
    stream = pytest.importorskip("mip_dist.data.stream")
    synthetic = pytest.importorskip("mip_dist.demo.synthetic")
    shards_mod = pytest.importorskip("mip_dist.data.shards")
    root, shards = tmp_path / "syn", tmp_path / "shards"
    synthetic.generate_synthetic(str(root), num_train_ids=4, num_test_ids=4, images_per_camera=2,
                                 img_size=(128, 64), workers=1)
    shards_mod.write_shards("synthetic", str(root), str(shards), workers=1, progress=False)
    index = stream.read_index(str(shards))
    _, ours = release_model(num_classes=int(index["num_classes"]))
    assert int(index["num_cameras"]) >= NUM_CAMERAS
    sd = to_their_naming(ours)
    sd["base.sie_embed"] = torch.randn(int(index["num_cameras"]), 1, 128)
    their = _save(sd, tmp_path / "their.pth")
    cli = _load_launch("evaluate")
    from mip_dist.config import save_config

    config = tmp_path / "tiny_release.yaml"  # what the tensors cannot tell (image size, stride, heads)
    save_config(load_config(TINY, ["model.layout=release"]), config)
    out = tmp_path / "eval"  # detected as a release checkpoint (no --release needed)
    rc = cli.main(["--checkpoint", str(their), "--config", str(config), "--out", str(out), "--protocol", "sysu",
                   "--device", "cpu", f"data.shards={shards}", "eval.trials=2"])
    assert rc == 0
    assert "all_single" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["results"]["all_single"]["trials"] == 2


def test_release_model_makes_no_host_syncs_and_trains_every_trainable_parameter():
    from fake_cuda import SyncCounter

    from mip_dist.engine.optim import build_param_groups
    from mip_dist.losses import MIPLoss
    from mip_dist.model import param_category

    cfg = load_config(TINY, ["model.layout=release"])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.attention.__class__(impl="torch"), NUM_CLASSES, NUM_CAMERAS).train()
    images, modality, camera = inputs(cfg, [1, 1, 1, 1, 0, 0, 0, 0])
    pids = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    with SyncCounter() as counter:
        loss, _ = MIPLoss(cfg.loss)(model(images, modality, camera), pids, modality, epoch=100)
        loss.backward()
    assert counter.count == 0, counter.ops
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    grouped = {id(p) for g in build_param_groups(model.named_parameters(), cfg.optim, param_category)
               for p in g["params"]}
    assert not any(id(p) in grouped for p in model.blocks[-1].parameters())  # the skipped block is not optimised


def test_release_layout_takes_imagenet_weights_as_theirs(tmp_path):
    """b1/b2 load the checkpoint's last block; block depth-2 is loaded too, though never run."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=128, depth=4, num_heads=4,
                            num_classes=0)
    sd = vit.state_dict()
    torch.save(sd, tmp_path / "vit.pth")
    _, model = release_model()
    report = load_pretrained(model, str(tmp_path / "vit.pth"))
    assert report["unexpected"] == []
    for copy in (model.b1.block, model.b2.block):
        assert torch.equal(copy.attn.qkv.weight, sd["blocks.3.attn.qkv.weight"])
    assert torch.equal(model.blocks[-1].mlp.fc1.weight, sd["blocks.2.mlp.fc1.weight"])
    assert torch.equal(model.b1.norm.weight, sd["norm.weight"])


def test_release_layout_trains_through_the_engine_leaving_the_skipped_block_as_loaded(tmp_path):
    """One epoch through launch/train.py: block depth-2 leaves training exactly as initialised (as theirs,
    which never runs it), every other block moves."""
    import os
    import subprocess

    from test_train_distributed import make_tiny_shards

    args = make_tiny_shards(tmp_path) + ["model.layout=release", "train.epochs=1", "train.run_name=release",
                                         "train.eval_every_epochs=0"]
    r = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "--config", "configs/tiny.yaml", *args],
                       cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = tmp_path / "runs" / "release"
    cfg = load_config(run_dir / "config.yaml")
    blob = load_exported(run_dir / "model_final.pt")
    torch.manual_seed(cfg.train.seed)  # the trainer's model init: seed, then build
    init = build_model(cfg.model, cfg.attention, blob["num_classes"], blob["num_cameras"]).state_dict()
    final = blob["model"]
    skipped = [k for k in final if k.startswith(f"blocks.{cfg.model.depth - 2}.")]
    assert skipped and all(torch.equal(final[k], init[k]) for k in skipped)
    assert not torch.equal(final["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])
    assert not torch.equal(final["iael_heads.0.bn.bias"], init["iael_heads.0.bn.bias"])  # trainable in release


@pytest.mark.parametrize("impl", ["concat", "triton"])
def test_release_layout_is_the_same_function_for_every_attention_impl(impl, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # triton on CPU tensors runs interpreted
    cfg, ref = release_model()
    other = build_model(cfg.model, cfg.attention.__class__(impl=impl), NUM_CLASSES, NUM_CAMERAS).eval()
    other.load_state_dict(ref.state_dict())
    images, mod, cam = inputs(cfg, [0, 1, 1, 0])
    with torch.no_grad():
        assert rel_err(other.extract(images, mod, cam), ref.extract(images, mod, cam)) < 1e-5


def test_convert_refuses_model_overrides_the_tensors_decide(tmp_path, capsys):
    """A model key the checkpoint's tensors determine is refused by name, not silently ignored."""
    _, ours = release_model()
    their = _save(to_their_naming(ours), tmp_path / "their.pth")
    cli = _load_launch("convert_release")
    rc = cli.main([str(their), str(tmp_path / "out.pt"), "model.iael_heads=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: model.iael_heads: read from the checkpoint's tensors")
    assert not (tmp_path / "out.pt").exists()
