"""Shard integrity: a shard whose bytes changed after it was written (one flipped byte, size unchanged) is
found as it is read, counted against data.max_error_rate and named, never cached as clean, refused by
evaluation; make_shards.py --verify checks a folder; an error in a loader worker reaches the user as one line."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from mip_dist.cli import report_error
from mip_dist.config import DataConfig
from mip_dist.data.shard_index import ShardError
from mip_dist.data.stream import DataError, build_test_loader, build_train_stream
from mip_dist.engine.file_hash import sha256_file, sidecar_path, write_sidecar

from conftest import flip_inside_largest_tensor, load_launch_script
from test_train_distributed import make_tiny_shards


REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")
WRAPPER = ("Traceback", "DataLoader worker process", "Original")


def flip_image_byte(tar: Path) -> None:
    """Flip one byte inside the first image of a tar: same size, other sha256, still a valid tar."""
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if not m.name.endswith(".json"))
    data = bytearray(tar.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    tar.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny run's synthetic shards, written once and left intact (copied by the tests that damage them)."""
    root = tmp_path_factory.mktemp("integrity")
    return root, make_tiny_shards(root)


@pytest.fixture(scope="module")
def flipped(tiny, tmp_path_factory) -> tuple[Path, list[str]]:
    """The tiny run's shards with a byte flipped in place in train-000000.tar and test-000000.tar (the run's
    own synthetic set stays up to date: only the shards' bytes differ from index.json)."""
    root = tmp_path_factory.mktemp("flipped")
    shutil.copytree(tiny[0], root, dirs_exist_ok=True)  # copy2 keeps the set's mtimes: it stays up to date
    for name in ("train-000000.tar", "test-000000.tar"):
        flip_image_byte(root / "shards" / name)
    overrides = [o.replace(str(tiny[0]), str(root)) for o in tiny[1]]
    return root, overrides


def _train(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def counted(flipped) -> tuple[subprocess.CompletedProcess, Path]:
    """A run on the flipped shards with in-process loading and the default error rate; its exported model."""
    root, overrides = flipped
    run = _train(overrides + ["train.run_name=counted", "data.workers=0"])
    return run, root / "runs" / "counted" / "model_final.pt"


def _one_line(stderr: str) -> str:
    """The run's one `error:` line; no traceback or DataLoader wrapper text anywhere."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert not any(w in stderr for w in WRAPPER), stderr[-3000:]
    return errors[0]


def test_a_flipped_byte_is_counted_and_named_and_stops_training_past_the_rate(flipped, counted):
    """Today this trained to exit 0 without a word. In-process loading counts it (default rate: the run
    finishes); one loader worker with data.max_error_rate=0 ends the run with one line naming the shard."""
    root, overrides = flipped
    shard = root / "shards" / "train-000000.tar"
    r = counted[0]
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checksum error in shard {shard}" in r.stderr and "index.json lists" in r.stderr
    r = _train(overrides + ["train.run_name=stopped", "data.workers=1", "data.max_error_rate=0"])
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_line(r.stderr)
    assert "DataError" in line and "exceed data.max_error_rate=0.0" in line
    assert f"checksum error in shard {shard}" in line


def raised(read: Callable[[], object]) -> BaseException:
    """The exception `read()` raises, without its traceback: the traceback's frames would keep a loader's
    worker alive in a reference cycle until the garbage collector's 5 s join."""
    try:
        read()
    except Exception as exc:  # noqa: BLE001 - the caller checks the type
        return exc.with_traceback(None)
    raise AssertionError("nothing was raised")


def _data_cfg(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), batch_size=8, num_instances=2, img_size=(64, 32), workers=0, buffer_size=16,
                steps_per_epoch=3, max_error_rate=0.5)
    return DataConfig(**{**base, **kw})


def test_a_changed_shard_is_never_cached_and_counts_on_every_pass(tiny, flipped):
    for root, changed in ((tiny[0], False), (flipped[0], True)):
        stream = build_train_stream(_data_cfg(root / "shards", cache_mb=64, steps_per_epoch=20), seed=0, rank=0,
                                    world_size=1)  # 160 samples an epoch: the 128-sample shard is read through
        for _ in range(2):
            list(stream)
        cached = str(root / "shards" / "train-000000.tar") in stream.cache._shards
        assert (cached, stream.error_count >= 2) == (not changed, changed)  # a changed one: counted on each pass


@pytest.mark.parametrize("workers", [0, 1])
def test_evaluation_refuses_a_changed_test_shard(flipped, workers):
    shards = flipped[0] / "shards"
    exc = raised(lambda: list(build_test_loader(_data_cfg(shards, workers=workers), batch_size=16)))
    assert type(exc) is ShardError
    text = str(exc)
    assert f"test shard {shards / 'test-000000.tar'} has sha256" in text and "evaluation refuses it" in text
    assert "\n" not in text and not any(w in text for w in WRAPPER)


def test_evaluate_cli_refuses_a_changed_test_shard_in_one_line(flipped, counted, capsys, monkeypatch):
    monkeypatch.delenv("MIP_DEBUG", raising=False)
    root, model = flipped[0], counted[1]
    assert model.is_file(), counted[0].stderr[-3000:]
    evaluate = load_launch_script("evaluate", "integrity_evaluate")
    assert evaluate.main(["--checkpoint", str(model), "--shards", str(root / "shards"), "--device", "cpu",
                          "data.workers=1"]) == 2
    line = _one_line(capsys.readouterr().err)  # besides the progress lines
    assert line.startswith("error: test shard ") and "test-000000.tar has sha256" in line, line


def test_make_shards_verify_names_each_bad_shard(tiny, tmp_path, capsys):
    make_shards = load_launch_script("make_shards", "integrity_make_shards")
    good = tiny[0] / "shards"
    assert make_shards.main(["--verify", str(good)]) == 0
    assert "all 2 shards" in capsys.readouterr().out
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    flip_image_byte(bad / "train-000000.tar")
    (bad / "test-000000.tar").unlink()
    assert make_shards.main(["--verify", str(bad)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"bad shard {bad / 'train-000000.tar'}: " + out[0].split(": ", 1)[1]
    assert "has sha256" in out[0] and "index.json lists" in out[0]
    assert out[1] == f"bad shard {bad / 'test-000000.tar'}: missing"
    assert len(out) == 3 and out[2].startswith("2 of 2 shards")
    (bad / "index.json").unlink()
    assert make_shards.main(["--verify", str(bad)]) == 2
    assert "error: no index.json in" in capsys.readouterr().err


def _damage(tar: Path, kind: str, other: Path) -> None:
    data = tar.read_bytes()
    if kind == "truncated":
        tar.write_bytes(data[: len(data) // 3])
    elif kind == "garbage":
        tar.write_bytes(bytes((7 * i) % 251 for i in range(len(data))))
    else:  # another dataset's (here: the test split's) tar under this name
        tar.write_bytes(other.read_bytes())


@pytest.mark.parametrize("kind", ["truncated", "garbage", "foreign"])
def test_a_worker_error_reaches_the_user_as_one_line(tiny, tmp_path, kind, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(tiny[0] / "shards", shards)
    tar = shards / "train-000000.tar"
    _damage(tar, kind, shards / "test-000000.tar")
    stream = build_train_stream(_data_cfg(shards, workers=1, max_error_rate=0.01), seed=0, rank=0, world_size=1)
    exc = raised(lambda: list(stream))
    assert type(exc) is DataError
    text = str(exc)
    assert "\n" not in text and not any(w in text for w in WRAPPER), text
    assert f"shard {tar}" in text and "rank 0 worker 0" in text
    assert report_error(exc, debug=False) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: DataError: rank 0 worker 0: ") and f"{tar}" in err[0]


# ------------------------------------------------------------------ exported models carry a sha256 sidecar


def test_an_exported_model_has_a_sidecar_that_sha256sum_accepts(counted):
    model = counted[1]
    assert model.is_file(), counted[0].stderr[-3000:]
    side = sidecar_path(model)
    assert side.read_text() == f"{sha256_file(model)}  {model.name}\n"
    if shutil.which("sha256sum"):
        assert subprocess.run(["sha256sum", "-c", side.name], cwd=model.parent, capture_output=True).returncode == 0


def test_evaluate_refuses_an_exported_model_with_a_flipped_byte(tiny, counted, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MIP_DEBUG", raising=False)
    model = tmp_path / "model_final.pt"
    shutil.copy(counted[1], model)
    shutil.copy(sidecar_path(counted[1]), sidecar_path(model))
    flip_inside_largest_tensor(model)  # still a loadable torch file: only the hash can tell
    evaluate = load_launch_script("evaluate", "integrity_evaluate")
    assert evaluate.main(["--checkpoint", str(model), "--shards", str(tiny[0] / "shards"), "--device", "cpu"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {model}: its bytes hash to sha256 ") and "model_final.pt.sha256" in line, line
    sidecar_path(model).unlink()  # a model copied without its sidecar is hashed and used
    assert evaluate.main(["--checkpoint", str(model), "--shards", str(tiny[0] / "shards"), "--device", "cpu",
                          "eval.trials=1"]) == 0


def test_convert_release_checks_a_sidecar_beside_the_authors_file(tmp_path, capsys):
    from test_release import TINY, release_model, to_their_naming

    _, ours = release_model()
    src = tmp_path / "theirs.pth"
    torch.save(to_their_naming(ours), src)
    write_sidecar(src)
    flip_inside_largest_tensor(src)
    convert = load_launch_script("convert_release", "integrity_convert")
    assert convert.main([str(src), str(tmp_path / "out.pt"), "--config", str(TINY)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(src) in line and "theirs.pth.sha256" in line and not (tmp_path / "out.pt").exists(), line
    write_sidecar(src)  # recorded again for the file as it is now: converts, and the output gets its own sidecar
    assert convert.main([str(src), str(tmp_path / "out.pt"), "--config", str(TINY)]) == 0
    assert sidecar_path(tmp_path / "out.pt").read_text().split()[0] == sha256_file(tmp_path / "out.pt")
