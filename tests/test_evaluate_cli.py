"""launch/evaluate.py: checkpoint/config/protocol errors, the table, figures, and the run end to end."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mip_dist.config import load_config, to_dict
from mip_dist.engine.export import load_exported
from mip_dist.engine.safe_load import CheckpointError
from mip_dist.eval import visualize as vis

from conftest import load_launch_script

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


cli = load_launch_script("evaluate", "launch_evaluate")


@pytest.fixture(scope="module")
def tiny_cfg():
    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg):
    model_mod = pytest.importorskip("mip_dist.model")
    torch.manual_seed(0)
    return model_mod.build_model(tiny_cfg.model, tiny_cfg.attention, num_classes=6, num_cameras=6).eval()


def _export(path: Path, model, cfg, num_classes=6, num_cameras=6) -> Path:
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "num_classes": num_classes,
                "num_cameras": num_cameras}, path)
    return path


class Arbitrary:
    """An arbitrary pickled object: refused by weights_only=True."""


def test_missing_and_foreign_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        load_exported(str(tmp_path / "nope.pt"))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing config, model, num_cameras, num_classes"):
        load_exported(str(tmp_path / "other.pt"))
    torch.save({"model": Arbitrary()}, tmp_path / "pickle.pt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_exported(str(tmp_path / "pickle.pt"))


def test_checkpoint_from_another_config_is_rejected(tmp_path, tiny_cfg, tiny_model):
    blob = load_exported(str(_export(tmp_path / "m.pt", tiny_model, tiny_cfg)))
    cfg = cli.resolve_config(None, ["eval.trials=2"], blob, "m.pt")  # the checkpoint's own config
    assert cfg.model.embed_dim == 128 and cfg.eval.trials == 2
    with pytest.raises(cli.EvalError, match="model.depth: checkpoint 4, config 5"):
        cli.resolve_config(str(ROOT / "configs" / "tiny.yaml"), ["model.depth=5"], blob, "m.pt")
    # same config, but weights of a different architecture
    other_cfg = load_config(ROOT / "configs" / "tiny.yaml", ["model.use_ipg=false"])
    other = pytest.importorskip("mip_dist.model").build_model(other_cfg.model, other_cfg.attention, 6, 6)
    bad = load_exported(str(_export(tmp_path / "bad.pt", other, tiny_cfg)))
    with pytest.raises(cli.EvalError, match="does not fit the model"):
        cli.build_and_load(tiny_cfg, bad, {"num_classes": 6}, "bad.pt")
    with pytest.raises(cli.EvalError, match="num_classes=6 but the shards' index.json says 9"):
        cli.build_and_load(tiny_cfg, blob, {"num_classes": 9}, "m.pt")
    loaded = cli.build_and_load(tiny_cfg, blob, {"num_classes": 6, "num_cameras": 6}, "m.pt")
    for k, v in tiny_model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_unknown_protocol_exits_2_with_message(tmp_path, tiny_cfg, tiny_model, capsys):
    ckpt = _export(tmp_path / "m.pt", tiny_model, tiny_cfg)
    assert cli.main(["--checkpoint", str(ckpt), "--protocol", "market1501"]) == 2
    assert "unknown protocol(s) ['market1501']" in capsys.readouterr().err
    assert cli.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _fake_results():
    curve = list(np.linspace(40, 90, 20))
    one = {"R1": 40.0, "R10": 80.0, "R20": 90.0, "mAP": 35.5, "mINP": 20.25, "trials": 10, "cmc": curve}
    one.update({f"{k}_std": 1.5 for k in ("R1", "R10", "R20", "mAP", "mINP")})
    two = dict(one, trials=1)
    return {"all_single": one, "visible_to_thermal": two, "all_single/mAP": 35.5}


def test_table_and_cmc_plot(tmp_path):
    from mip_dist.eval.report import format_table

    table = format_table(_fake_results())
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["setting", "trials", "R1"] and len(lines) == 4
    assert "40.00 ± 1.50" in lines[2] and "±" not in lines[3]  # std only with several trials
    path = vis.plot_cmc(_fake_results(), tmp_path / "cmc.png")
    assert path.read_bytes()[:8] == PNG


def test_loss_curve_from_metrics_jsonl(tmp_path):
    from mip_dist.eval.report import plot_loss_curve

    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss": 3.0, "id": 2.0, "triplet": 1.0, "lr": 0.1},
        {"kind": "eval", "all_single/mAP": 10.0},
        {"step": 2, "loss": 2.5, "id": 1.7, "triplet": 0.8, "lr": 0.1}]) + "\n")
    assert plot_loss_curve(log, tmp_path / "loss.png").read_bytes()[:8] == PNG
    (tmp_path / "empty.jsonl").write_text(json.dumps({"kind": "eval"}) + "\n")
    with pytest.raises(ValueError, match="no training loss"):
        plot_loss_curve(tmp_path / "empty.jsonl", tmp_path / "none.png")


def _batches(n_ids=6, per=4, size=(128, 64)):
    gen = torch.Generator().manual_seed(0)
    out = []
    for pid in range(n_ids):
        cams = torch.tensor([1, 3, 4, 6][:per])
        out.append({"images": torch.randn(per, 3, *size, generator=gen), "key": [f"{pid}_{c}" for c in cams.tolist()],
                    "pid": torch.full((per,), pid), "camera": cams,
                    "modality": torch.tensor([1 if c in (1, 2, 4, 5) else 0 for c in cams.tolist()])})
    return out


def test_tsne_and_attention_figures_from_tiny_model(tmp_path, tiny_model):
    emb = vis.instance_prompt_embedding(tiny_model, _batches(), device="cpu", max_ids=5, max_per_id=4)
    assert emb["embedding"].shape == (20, 2) and sorted(set(emb["pid"].tolist())) == [0, 1, 2, 3, 4]
    assert set(emb["modality"].tolist()) == {0, 1}
    assert vis.plot_tsne(emb["embedding"], emb["pid"], emb["modality"], tmp_path / "t.png").read_bytes()[:8] == PNG
    images = vis.collect_images(_batches(), ["0_3", "0_1", "2_6", "5_4"])
    assert set(images) == {"0_3", "0_1", "2_6", "5_4"} and images["2_6"]["modality"] == 0
    maps = vis.attention_maps(tiny_model, [images["0_3"], images["0_1"]], device="cpu")
    assert maps[0].shape == (128, 64) and maps[0].min() == 0.0 and maps[0].max() == pytest.approx(1.0)
    pairs = [(images["0_3"], images["0_1"], True), (images["2_6"], images["5_4"], False)]
    assert vis.plot_attention_pairs(tiny_model, pairs, tmp_path / "a.png", device="cpu").read_bytes()[:8] == PNG


def test_select_pairs_distinct_query_identities():
    d = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.1, 0.3], [0.9, 0.8, 0.1]])
    assert vis.select_pairs(d, [1, 1, 2], [1, 3, 2], k=4) == [(0, 0, True), (2, 2, True)]


def test_end_to_end_on_tiny_checkpoint(tmp_path, tiny_cfg, capsys):
    stream = pytest.importorskip("mip_dist.data.stream", reason="mip_dist.data.stream not written yet")
    synthetic = pytest.importorskip("mip_dist.demo.synthetic")
    shards_mod = pytest.importorskip("mip_dist.data.shards", reason="shard writer not written yet")
    root, shards = tmp_path / "syn", tmp_path / "shards"
    synthetic.generate_synthetic(str(root), num_train_ids=4, num_test_ids=4, images_per_camera=2,
                                 img_size=(128, 64), workers=1)
    shards_mod.write_shards("synthetic", str(root), str(shards), workers=1, progress=False)
    index = stream.read_index(str(shards))
    n_cls, n_cam = int(index["num_classes"]), int(index["num_cameras"])
    model = pytest.importorskip("mip_dist.model").build_model(tiny_cfg.model, tiny_cfg.attention, n_cls, n_cam)
    ckpt = _export(tmp_path / "m.pt", model, tiny_cfg, n_cls, n_cam)
    out = tmp_path / "eval"
    rc = cli.main(["--checkpoint", str(ckpt), "--out", str(out), "--protocol", "sysu", "sysu_authors",
                   "--device", "cpu", "--visualize", f"data.shards={shards}", "eval.trials=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "all_single" in printed and "authors_all_single" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["results"]["all_single"]["trials"] == 2 and res["results"]["authors_all_single"]["trials"] == 1
    assert res["meta"]["num_test_images"] == len(index["test_records"])
    for name in ("cmc.png", "tsne_instance_prompts.png", "attention_all_single.png", "ranklist_all_single.png",
                 "worst_ap_all_single.png", "ranklist_authors_all_single.png"):
        assert (out / name).read_bytes()[:8] == PNG
