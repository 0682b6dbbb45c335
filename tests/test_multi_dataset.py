"""Several datasets in one run: `data.shards` as a list is validated key by key, the datasets share one label
space with their own cameras, evaluation runs each dataset's protocol on its own test shards (with its
cameras where the model's camera table has them), and the best metric and exports follow."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mip_dist.config import ConfigError, load_config
from mip_dist.engine.checkpoint import load_exported
from mip_dist.engine.evaluator import extract_features
from mip_dist.engine.run_checks import check_data_for_run
from mip_dist.engine.validation import EvalTarget, Validator

from test_evaluate_cli import cli  # launch/evaluate.py loaded as a module
from test_train_distributed import make_tiny_shards, tiny_overrides

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """Two synthetic sets with different seeds and identity counts (8 and 6), each with its own shards."""
    root = tmp_path_factory.mktemp("multi")
    folders = []
    for seed, ids, test_ids in ((0, 8, 4), (1, 6, 3)):
        sub = root / f"set{seed}"
        make_tiny_shards(sub, extra=[f"data.synthetic_seed={seed}", f"data.synthetic_ids={ids}",
                                     f"data.synthetic_test_ids={test_ids}"])
        folders.append(sub / "shards")
    return root, folders


def _overrides(root: Path, folders: list[Path], *extra: str) -> list[str]:
    base = [o for o in tiny_overrides(root) if not o.startswith(("data.shards=", "data.root="))]
    listed = f"data.shards=[{{path: {folders[0]}, name: a}}, {{path: {folders[1]}, name: b, weight: 2}}]"
    return [*base, listed, *extra]


def test_shard_list_errors_name_the_entry():
    bad = {"data.shards=[{path: x, weight: -1}]": "data.shards[0].weight",
           "data.shards=[{path: x}, {pth: y}]": "data.shards[1].pth",
           "data.shards=[{path: x, protocol: market}]": "data.shards[0].protocol",
           "data.shards=[x/s, y/s]": "data.shards: dataset name(s) s used twice",
           "data.shards=[]": "data.shards: an empty list"}
    for override, named in bad.items():
        with pytest.raises(ConfigError, match=re.escape(named)):
            load_config(REPO / "configs" / "tiny.yaml", [override])
    with pytest.raises(ConfigError, match="data.train_urls"):
        load_config(REPO / "configs" / "tiny.yaml", ["data.shards=[a, b]", "data.train_urls=x/t-{0..1}.tar"])
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["data.shards=[sets/sysu, {path: sets/llcm, weight: 3}]"])
    assert [(s.name, s.weight) for s in cfg.data.sources()] == [("sysu", 1.0), ("llcm", 3.0)]


def test_label_space_offsets_and_protocol_checks(two_datasets):
    root, folders = two_datasets
    cfg = load_config(REPO / "configs" / "tiny.yaml", _overrides(root, folders))
    num_classes, num_cameras, sources = check_data_for_run(cfg)
    assert (num_classes, num_cameras) == (14, 12)
    assert [(s.name, s.label_offset, s.camera_offset, s.weight) for s in sources] == [("a", 0, 0, 1.0),
                                                                                     ("b", 8, 6, 2.0)]
    wrong = _overrides(root, folders)[:-1] + [f"data.shards=[{{path: {folders[0]}, name: a}}, "
                                              f"{{path: {folders[1]}, name: b, protocol: regdb}}]"]
    with pytest.raises(ConfigError, match=r"data.shards\[1\].protocol: regdb cannot evaluate synthetic"):
        check_data_for_run(load_config(REPO / "configs" / "tiny.yaml", wrong))
    twice = _overrides(root, folders)[:-1] + [f"data.shards=[{{path: {folders[0]}, name: a}}, "
                                               f"{{path: {folders[0]}, name: b}}]"]
    with pytest.raises(ConfigError, match="already listed"):
        check_data_for_run(load_config(REPO / "configs" / "tiny.yaml", twice))


class _CameraProbe(torch.nn.Module):
    """A model whose feature is the camera index it was given."""

    def extract(self, images, modality, camera):
        return torch.stack([camera.float(), torch.ones_like(camera, dtype=torch.float)], dim=1)


def test_evaluation_shifts_cameras_into_the_models_table():
    batch = {"images": torch.zeros(3, 3, 8, 4), "modality": torch.tensor([0, 1, 1]),
             "camera": torch.tensor([1, 2, 6]), "key": ["k0", "k1", "k2"]}
    feats, keys = extract_features(_CameraProbe(), [batch], device="cpu", camera_offset=6, distributed=False)
    assert keys == ["k0", "k1", "k2"] and feats[:, 0].tolist() == [6.0, 7.0, 11.0]  # 1-based + offset - 1


def test_validator_cadence_and_best_metric_of_the_first_dataset(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["train.epochs=10", "train.eval_every_epochs=4"])
    targets = [EvalTarget("a", cfg.data, {}, ("sysu",)), EvalTarget("b", cfg.data, {}, ("sysu",), 6)]
    v = Validator(cfg, targets, tmp_path, lambda: None, is_main=False, device=torch.device("cpu"),
                  num_classes=14, num_cameras=12)
    assert [e for e in range(1, 11) if v.should_evaluate(e)] == [4, 8]  # epoch 10: the final evaluation
    assert v.best_key == "a/all_single/mAP"
    named = load_config(REPO / "configs" / "tiny.yaml", ["train.best_metric=b/all_single/R1"])
    assert Validator(named, targets, tmp_path, lambda: None, is_main=False, device=torch.device("cpu"),
                     num_classes=14, num_cameras=12).best_key == "b/all_single/R1"
    single = Validator(cfg, [EvalTarget("", cfg.data, {}, ("sysu",))], tmp_path, lambda: None, is_main=False,
                       device=torch.device("cpu"), num_classes=8, num_cameras=6)
    assert single.best_key == "all_single/mAP"


def test_two_datasets_train_in_one_run_and_evaluate_each(two_datasets):
    root, folders = two_datasets
    args = _overrides(root, folders, "train.epochs=1", "train.run_name=two", "train.eval_every_epochs=1",
                      "eval.trials=2")
    r = subprocess.run([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args], cwd=REPO,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "2 datasets in one label space" in r.stderr and "labels 8..13, cameras 7..12" in r.stderr
    run_dir = root / "runs" / "two"
    blob = load_exported(run_dir / "model_final.pt")
    assert (blob["num_classes"], blob["num_cameras"]) == (14, 12)
    results = json.loads((run_dir / "results.json").read_text())["results"]
    for name in ("a", "b"):
        assert results[f"{name}/all_single"]["trials"] == 2 and 0 <= results[f"{name}/all_single/mAP"] <= 100
    assert results["a/all_single"]["num_query"] != results["b/all_single"]["num_query"]  # each its own test set
    summary = json.loads((run_dir / "FINISHED").read_text())
    assert summary["best_metric"] == results["a/all_single/mAP"]

    # evaluate.py: one dataset of the two by name, with its own protocol and cameras
    out = root / "eval_b"
    assert cli.main(["--checkpoint", str(run_dir / "model_final.pt"), "--dataset", "b", "--out", str(out),
                     "eval.trials=2", "--device", "cpu"]) == 0
    again = json.loads((out / "results_b.json").read_text())["results"]
    assert again["all_single/mAP"] == pytest.approx(results["b/all_single/mAP"], abs=1e-6)
    assert blob["datasets"][1] == {"name": "b", "path": str(folders[1]), "protocol": "sysu", "dataset": "synthetic",
                                   "camera_offset": 6, "num_cameras": 6}


def test_evaluate_asks_which_dataset_and_allows_cross_dataset_on_purpose(two_datasets, capsys, tmp_path):
    root, folders = two_datasets
    run_dir = root / "runs" / "two"
    if not (run_dir / "model_final.pt").is_file():
        pytest.skip("needs the two-dataset run of test_two_datasets_train_in_one_run_and_evaluate_each")
    final = str(run_dir / "model_final.pt")
    assert cli.main(["--checkpoint", final, "--device", "cpu"]) == 2
    assert "trained on 2 datasets (a, b): pass --dataset NAME" in capsys.readouterr().err
    assert cli.main(["--checkpoint", final, "--dataset", "c", "--device", "cpu"]) == 2
    assert "'c' is not one of them" in capsys.readouterr().err
    # a one-dataset model (trained on a: 14 ids here) against b's test shards: refused unless asked for
    one = load_exported(final)
    one.pop("datasets")
    one["config"]["data"]["shards"] = str(folders[0])
    single = tmp_path / "single.pt"
    torch.save(one, single)
    args = ["--checkpoint", str(single), "--shards", str(folders[1]), "--device", "cpu", "eval.trials=1",
            "--out", str(tmp_path / "cross")]
    assert cli.main(args) == 2
    assert "pass --cross-dataset" in capsys.readouterr().err
    assert cli.main(args + ["--cross-dataset"]) == 0
