"""A new user's first day with launch/train.py on real shards: the dataset read from the shards' index.json,
a protocol that cannot evaluate them refused before any work, and the final table printed once."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import load_launch_script
from test_cli_errors import regdb_split2_shards  # noqa: F401 - fixture reused

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


train = load_launch_script("train", "day_one_train")
SMALL_BATCH = ["data.batch_size=8", "data.num_instances=2"]  # 2 identities: the fabricated split has 3


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("MIP_DEBUG", raising=False)


@pytest.fixture
def no_training(monkeypatch):
    """Stands in for the Trainer: records the config that would have trained."""
    started = []

    def fake_train(cfg, args, debug):
        started.append(cfg)
        return {"status": "finished", "step": 0, "run_dir": str(cfg.train.output_dir)}

    monkeypatch.setattr(train, "train", fake_train)
    return started


def test_tiny_config_on_regdb_shards_is_refused_before_training(tmp_path, regdb_split2_shards, no_training,
                                                                capsys):
    # tiny.yaml: eval.protocols [sysu], evaluation off during training (train.eval_every_epochs: 0)
    argv = ["--config", str(TINY), "data.dataset=regdb", "data.regdb_split=2", f"data.shards={regdb_split2_shards}",
            f"train.output_dir={tmp_path}", *SMALL_BATCH]
    assert train.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "eval.protocols: sysu cannot evaluate regdb shards; use regdb" in err[0], err
    assert no_training == []


def test_dataset_comes_from_the_shards_when_the_config_does_not_name_it(tmp_path, regdb_split2_shards,
                                                                        no_training, capsys, caplog):
    data = yaml.safe_load(TINY.read_text())
    del data["data"]["dataset"]
    config = tmp_path / "no_dataset.yaml"
    config.write_text(yaml.safe_dump(data))
    argv = ["--config", str(config), "data.regdb_split=2", f"data.shards={regdb_split2_shards}",
            "eval.protocols=[regdb]", f"train.output_dir={tmp_path}", *SMALL_BATCH]
    with caplog.at_level(logging.INFO, logger="mip_dist"):
        assert train.main(argv) == 0, capsys.readouterr().err
    assert [cfg.data.dataset for cfg in no_training] == ["regdb"]
    assert f"data.dataset: regdb (from {regdb_split2_shards / 'index.json'})" in caplog.text
    # and the protocol check applies to the dataset read from the shards
    no_training.clear()
    assert train.main(argv[:4] + argv[5:] + ["eval.protocols=[sysu]"]) == 2
    assert "eval.protocols: sysu cannot evaluate regdb shards" in capsys.readouterr().err and no_training == []


def test_final_table_is_printed_once(tmp_path, monkeypatch, capsys, caplog):
    from mip_dist.config import load_config
    from mip_dist.engine import validation

    results = {"all_single": {"R1": 40.0, "R10": 80.0, "R20": 90.0, "mAP": 35.5, "mINP": 20.25, "trials": 1,
                              "cmc": [40.0] * 20}, "all_single/mAP": 35.5}
    monkeypatch.setattr(validation, "evaluate", lambda *args, **kwargs: dict(results))
    cfg = load_config(TINY, ["train.eval_every_epochs=1"])
    targets = [validation.EvalTarget("", cfg.data, {}, ("sysu",))]
    v = validation.Validator(cfg, targets, tmp_path, torch.nn.Identity, is_main=True, device=torch.device("cpu"),
                             num_classes=4, num_cameras=6)
    monkeypatch.setattr(v, "export", lambda path, state: path)
    with caplog.at_level(logging.INFO, logger="mip_dist"):
        v.run({}, epoch=1, step=10, final=True)
        train.report({"status": "finished", "step": 10, "run_dir": str(tmp_path)})
    shown = caplog.text + capsys.readouterr().out
    assert len(re.findall(r"setting +trials +R1", shown)) == 1, shown  # the table's header line
    assert (tmp_path / "results.json").is_file()
