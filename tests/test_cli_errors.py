"""One way to report errors in every CLI: one `error:` line naming the file/key/value, exit 2, traceback
only with --debug or MIP_DEBUG=1. Every bad input here fails before any heavy work (no training, no
feature extraction), so the whole file runs in seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mip_dist.config import load_config, to_dict

from conftest import load_launch_script
from test_data_layouts import make_regdb

ROOT = Path(__file__).resolve().parents[1]


make_shards, train, evaluate = (load_launch_script(name, f"cli_{name}")
                                for name in ("make_shards", "train", "evaluate"))


def _one_error_line(capsys, *needles: str) -> str:
    """stderr holds exactly one line, `error: ...`, containing every needle; no traceback."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0]
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv("MIP_DEBUG", raising=False)


# ---------------------------------------------------------------- make_shards.py
def test_make_shards_bad_inputs_are_one_line(tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        (["--dataset", "sysu", "--root", str(tmp_path / "absent"), "--out", out], [str(tmp_path / "absent"), "--root"]),
        (["--dataset", "regdb", "--root", str(tmp_path), "--out", out, "--regdb-split", "11"], ["--regdb-split 11"]),
        (["--dataset", "sysu", "--root", str(tmp_path), "--out", out, "--max-shard-samples", "0"],
         ["--max-shard-samples 0"]),
        (["--dataset", "sysu", "--root", str(tmp_path), "--out", str(tmp_path / "file.txt")], ["file.txt"]),
        (["--dataset", "regdb", "--root", str(tmp_path), "--out", out, "--quiet"], [str(tmp_path)]),  # no RegDB layout
    ]
    (tmp_path / "file.txt").write_text("not a folder")
    for argv, needles in cases:
        assert make_shards.main(argv) == 2, argv
        _one_error_line(capsys, *needles)


def test_make_shards_unexpected_error_hints_and_debug_shows_traceback(tmp_path, capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire at /x/y.tar")

    monkeypatch.setattr(make_shards, "write_shards", boom)
    argv = ["--dataset", "sysu", "--root", str(tmp_path), "--out", str(tmp_path / "o")]
    assert make_shards.main(argv) == 2
    _one_error_line(capsys, "RuntimeError: disk on fire at /x/y.tar", "--debug")
    assert make_shards.main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: RuntimeError")
    monkeypatch.setenv("MIP_DEBUG", "1")
    assert make_shards.main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


# ---------------------------------------------------------------- train.py
def test_train_bad_inputs_are_one_line(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    tiny = str(ROOT / "configs" / "tiny.yaml")
    cases = [
        (["--config", str(tmp_path / "missing.yaml")], ["missing.yaml", "config file not found"]),
        (["--config", str(bad_yaml)], ["bad.yaml", "not valid YAML"]),
        (["--config", tiny, "optim.nope=1"], ["unknown config key 'optim.nope'"]),
        (["--config", tiny, "data.regdb_split=11"], ["data.regdb_split: 11"]),
        (["--config", tiny, "data.dataset=sysu", f"data.shards={tmp_path / 'noshards'}"],
         ["data.shards", "noshards", "index.json"]),
    ]
    for argv, needles in cases:
        assert train.main(argv) == 2, argv
        _one_error_line(capsys, *needles)


def test_train_debug_prints_the_traceback(tmp_path, capsys):
    assert train.main(["--config", str(tmp_path / "missing.yaml"), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err and err.strip().splitlines()[-1].startswith("error: ")


# ---------------------------------------------------------------- evaluate.py
@pytest.fixture(scope="module")
def regdb_split2_shards(tmp_path_factory) -> Path:
    """Real shards of a fabricated RegDB tree, split 2."""
    from mip_dist.data.shards import write_shards

    base = tmp_path_factory.mktemp("regdb")
    root = make_regdb(base / "RegDB")
    write_shards("regdb", str(root), str(base / "shards2"), regdb_split=2, workers=1, progress=False)
    return base / "shards2"


def _regdb_checkpoint(path: Path, split: int, shards: Path) -> Path:
    """An exported-model file whose saved config says RegDB split `split` (weights never read here)."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["data.dataset=regdb", f"data.regdb_split={split}",
                                                      f"data.shards={shards}", "eval.protocols=[regdb]"])
    torch.save({"model": {}, "config": to_dict(cfg), "num_classes": 3, "num_cameras": 2}, path)
    return path


@pytest.mark.timeout(60)
def test_evaluate_regdb_split_mismatch_fails_before_the_model_or_features(tmp_path, regdb_split2_shards, capsys,
                                                                         monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the RegDB split must be checked before the model is built or features extracted")

    monkeypatch.setattr(evaluate, "build_and_load", never)
    monkeypatch.setattr(evaluate, "_init_process_group", never)
    ckpt = _regdb_checkpoint(tmp_path / "split1.pt", 1, regdb_split2_shards)
    assert evaluate.main(["--checkpoint", str(ckpt), "--shards", str(regdb_split2_shards)]) == 2
    _one_error_line(capsys, "split1.pt", "RegDB split 1", "data.regdb_split", "holds split 2", "--regdb-split 1")
    # several splits: the bad pair is found before the first good one is evaluated
    good = _regdb_checkpoint(tmp_path / "split2.pt", 2, regdb_split2_shards)
    assert evaluate.main(["--checkpoint", str(good), "--shards", str(regdb_split2_shards),
                          "--checkpoint", str(ckpt), "--shards", str(regdb_split2_shards)]) == 2
    _one_error_line(capsys, "split1.pt", "holds split 2")


def test_evaluate_bad_inputs_are_one_line(tmp_path, regdb_split2_shards, capsys):
    good = _regdb_checkpoint(tmp_path / "m.pt", 2, regdb_split2_shards)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt")], ["checkpoint not found", "missing.pt"]),
        (["--checkpoint", str(good), "--protocol", "market1501"], ["unknown protocol(s) ['market1501']"]),
        (["--checkpoint", str(tmp_path / "list.pt")], ["list.pt", "not an exported model"]),
        (["--checkpoint", str(good), "--shards", str(tmp_path / "noshards")], ["noshards", "index.json"]),
        (["--checkpoint", str(good), "--shards", "a", "--shards", "b"], ["1 --checkpoint but 2 --shards"]),
        (["--runs", str(tmp_path / "nothing*")], ["--runs", "no run folder matches"]),
        (["--checkpoint", str(good), "model.depth=5"], ["model.depth: checkpoint 4, config 5"]),
    ]
    for argv, needles in cases:
        assert evaluate.main(argv) == 2, argv
        _one_error_line(capsys, *needles)
    assert evaluate.main(["--checkpoint", str(tmp_path / "missing.pt"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_train_regdb_split_mismatch_fails_before_the_process_group(tmp_path, regdb_split2_shards, capsys,
                                                                   monkeypatch):
    import mip_dist.engine.distributed as distributed

    def never(*args, **kwargs):
        raise AssertionError("the RegDB split must be checked before the process group starts")

    monkeypatch.setattr(distributed, "init_distributed", never)
    argv = ["--config", str(ROOT / "configs" / "tiny.yaml"), "data.dataset=regdb", "data.regdb_split=1",
            f"data.shards={regdb_split2_shards}", "eval.protocols=[regdb]", f"train.output_dir={tmp_path}"]
    assert train.main(argv) == 2
    _one_error_line(capsys, "data.regdb_split=1", "RegDB split 2")
