"""Checkpoint safety with real tiny DeepSpeed engines on CPU: no code runs from a foreign pickle (resume,
export, evaluate, pretrained), a damaged newest checkpoint is skipped by --resume auto, a full disk gives one
clear error and no finished-looking tag, and evaluate names a DeepSpeed tag file or garbage in one line."""
from __future__ import annotations

import errno
import logging
import os
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mip_dist.config import load_config, to_dict
from mip_dist.engine import checkpoint as ckpt, export, safe_load, tags

ROOT = Path(__file__).resolve().parents[1]
DType = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


from conftest import flip_inside_largest_tensor
from test_evaluate_cli import cli  # launch/evaluate.py loaded as a module


class Evil:
    """Unpickling this creates `marker`: stands in for any code hidden in a checkpoint's pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _error_of(fn, *args) -> Exception | None:
    """The exception `fn(*args)` raises, None if it accepts the file (callers check the marker first)."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the type is asserted by the caller, after the marker check
        return exc
    return None


@pytest.fixture
def keep_group(monkeypatch):
    """evaluate's main() destroys any process group on exit; keep this module's shared one alive."""
    monkeypatch.setattr(dist, "destroy_process_group", lambda *args, **kwargs: None)


def _one_line(text: str) -> str:
    text = text.strip()
    assert text and "\n" not in text, f"expected one line, got:\n{text}"
    return text


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group for in-process DeepSpeed engines, removed (with its env vars) after the module."""
    import deepspeed

    from mip_dist.engine.distributed import free_port

    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = not dist.is_initialized()
    if started:
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    yield
    if started and dist.is_initialized():
        dist.destroy_process_group()
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups

        ds_comm.cdb = None  # DeepSpeed's handles on the destroyed groups: a later module's group starts afresh
        ds_groups._WORLD_GROUP = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_engine(stage: int = 0, precision: str = "fp32"):
    """A tiny Linear/BatchNorm model under DeepSpeed with the run config's DeepSpeed settings, one step taken."""
    import deepspeed

    from mip_dist.engine.ds_config import build_ds_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"train.zero_stage={stage}", f"train.precision={precision}",
                                                       "data.batch_size=8"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=build_ds_config(cfg, 1))
    engine.backward(engine(torch.randn(8, 4, dtype=DType[precision])).float().sum())
    engine.step()
    return engine, cfg


@pytest.fixture(scope="module")
def engine0(process_group):
    return make_engine(0, "fp32")


def client_state(cfg, **extra) -> dict:
    """Shaped like Trainer._client_state: RNG (NumPy arrays included), stream position, config."""
    stream = {"epoch": 1, "batches": 3, "seed": 0, "rank": 0, "world_size": 1, "workers": 0, "steps_per_epoch": 9,
              "error_count": 0}
    return {"epoch": 1, "micro_in_epoch": 3, "step": 1, "best_metric": 12.5, "bad_steps_total": 0, "world_size": 1,
            "ranks": [{"rng": ckpt.capture_rng(), "stream": stream}], "mip_config": to_dict(cfg), **extra}


def _weights_only_everywhere(monkeypatch) -> list:
    """Make any torch.load with weights_only other than True fail loudly; returns the list of loaded paths."""
    real, seen = torch.load, []

    def guarded(f, *args, **kwargs):
        assert kwargs.get("weights_only") is True, f"{f} was unpickled with weights_only={kwargs.get('weights_only')}"
        seen.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", guarded)
    return seen


# ------------------------------------------------------------------ case 3: no code execution from files


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "bf16"), (3, "fp16")])
def test_round_trip_loads_everything_with_weights_only(process_group, tmp_path, monkeypatch, stage, precision):
    engine, cfg = make_engine(stage, precision)
    saved_rng = ckpt.capture_rng()
    c = ckpt.Checkpointer(tmp_path / "run", keep_last=2, is_main=True)
    tag = c.save(engine, 1, client_state(cfg))
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    if stage < 3:  # ZeRO-3 keeps only partitions in the module
        with torch.no_grad():
            for p in engine.module.parameters():
                p.add_(1.0)
    seen = _weights_only_everywhere(monkeypatch)
    state = ckpt.Checkpointer.load(engine, tag)
    assert any(s.endswith("model_states.pt") for s in seen)  # DeepSpeed's own reads went through the guard
    if stage > 0:
        assert any(s.endswith("optim_states.pt") for s in seen)
    assert state["mip_config"] == to_dict(cfg) and state["best_metric"] == 12.5 and state["micro_in_epoch"] == 3
    ckpt.restore_rng(state["ranks"][0]["rng"])
    assert np.array_equal(np.random.get_state()[1], saved_rng["numpy"][1])
    assert int(engine.global_steps) == 1
    assert sorted(tags.read_manifest(tag)) == sorted(p.name for p in tag.iterdir() if p.name != tags.COMPLETE)
    for k, v in engine.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    if stage > 0:  # an optimizer shard deleted: named, from the manifest and from DeepSpeed's naming alike
        optim = next(tag.glob("*optim_states.pt"))
        optim.unlink()
        with pytest.raises(safe_load.DamagedCheckpointError, match=f"{optim.name}: missing"):
            tags.verify_tag(tag)
        (tag / tags.COMPLETE).write_text("1\n")  # a marker from before manifests existed
        with pytest.raises(safe_load.DamagedCheckpointError, match=f"{optim.name}: missing"):
            tags.verify_tag(tag)


def test_resume_never_runs_code_from_a_checkpoint(engine0, tmp_path, monkeypatch, caplog):
    engine, cfg = engine0
    marker = tmp_path / "PWNED"
    c = ckpt.Checkpointer(tmp_path / "run", keep_last=3, is_main=True)
    good = c.save(engine, 1, client_state(cfg))
    evil = c.save(engine, 2, client_state(cfg, evil=Evil(marker)))
    file = evil / "mp_rank_00_model_states.pt"
    err = _error_of(ckpt.Checkpointer.load, engine, evil)
    assert not marker.exists(), "code hidden in the checkpoint ran"
    assert isinstance(err, safe_load.UnsafeCheckpointError)
    msg = _one_line(str(err))
    assert str(file) in msg and "io.open" in msg and "weights_only=True" in msg
    # DeepSpeed's own load path refuses it too, without the up-front check
    monkeypatch.setattr(ckpt, "verify_tag", lambda tag_dir: None)
    err = _error_of(ckpt.Checkpointer.load, engine, evil)
    assert not marker.exists(), "DeepSpeed's load ran code hidden in the checkpoint"
    assert isinstance(err, safe_load.UnsafeCheckpointError) and str(file) in _one_line(str(err))
    monkeypatch.undo()
    # --resume auto does not pick it: the intact older checkpoint is used
    with caplog.at_level(logging.WARNING, logger=tags.__name__):
        assert tags.resolve_resume("auto", tmp_path / "run", tmp_path) == good
    assert any(evil.name in r.getMessage() and "io.open" in r.getMessage() for r in caplog.records)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["model", "config"])
def test_malicious_exported_model_is_refused_by_the_loader_and_by_evaluate(tmp_path, capsys, keep_group, where):
    marker, path = tmp_path / "PWNED", tmp_path / "model_best.pt"
    blob = {"model": {"w": torch.zeros(2)}, "config": {}, "num_classes": 2, "num_cameras": 2}
    blob[where] = Evil(marker)
    torch.save(blob, path)
    err = _error_of(export.load_exported, path)
    assert not marker.exists(), "code hidden in the exported model ran"
    assert isinstance(err, safe_load.UnsafeCheckpointError)
    msg = _one_line(str(err))
    assert str(path) in msg and "io.open" in msg and "weights_only=True" in msg
    assert cli.main(["--checkpoint", str(path)]) == 2
    assert not marker.exists(), "code hidden in the checkpoint ran"
    assert _one_line(capsys.readouterr().err) == f"error: {msg}"  # one loader: evaluate reports its error as is


def test_pretrained_never_runs_code(tmp_path):
    from mip_dist.model.pretrained import read_checkpoint

    marker, path = tmp_path / "PWNED", tmp_path / "vit.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 4), "extra": Evil(marker)}, path)
    err = _error_of(read_checkpoint, str(path))
    assert not marker.exists(), "code hidden in the pretrained checkpoint ran"
    assert isinstance(err, ValueError)
    msg = _one_line(str(err))
    assert msg.startswith("model.pretrained: ") and str(path) in msg and "io.open" in msg


# ------------------------------------------------------------------ case 7: damaged newest checkpoint


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "truncated":
        file.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        file.write_bytes(bytes(len(data)))
    else:
        file.unlink()


@pytest.mark.parametrize("how,reason", [("truncated", "truncated"), ("zeroed", "not a readable torch.save file"),
                                        ("deleted", "missing")])
def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(engine0, tmp_path, caplog, how, reason):
    engine, cfg = engine0
    run = tmp_path / "run"
    c = ckpt.Checkpointer(run, keep_last=3, is_main=True)
    good = c.save(engine, 1, client_state(cfg))
    bad = c.save(engine, 2, client_state(cfg))
    _damage(bad / "mp_rank_00_model_states.pt", how)
    with caplog.at_level(logging.WARNING, logger=tags.__name__):
        assert tags.resolve_resume("auto", run, tmp_path) == good
        assert tags.resolve_resume("auto", None, tmp_path) == good
        assert tags.resolve_resume(str(run), None, tmp_path) == good
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad) in m and reason in m for m in warned), warned
    # named explicitly: no silent fallback, but one line pointing at the intact one
    err = _error_of(tags.resolve_resume, str(bad), None, tmp_path)
    assert isinstance(err, safe_load.DamagedCheckpointError)
    msg = _one_line(str(err))
    assert str(bad) in msg and reason in msg and str(good) in msg
    # loading it directly is a clear error too, not PytorchStreamReader / KeyError / AssertionError
    err = _error_of(ckpt.Checkpointer.load, engine, bad)
    assert isinstance(err, safe_load.CheckpointError) and str(bad) in _one_line(str(err))
    assert ckpt.Checkpointer.load(engine, good)["step"] == 1


def _tensors(obj) -> list:
    """Every tensor inside nested dicts/lists, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def test_a_flipped_byte_inside_a_tensor_is_named_and_resume_falls_back(engine0, tmp_path, caplog):
    engine, cfg = engine0
    run = tmp_path / "run"
    c = ckpt.Checkpointer(run, keep_last=3, is_main=True)
    good = c.save(engine, 1, client_state(cfg))
    bad = c.save(engine, 2, client_state(cfg))
    states = bad / "mp_rank_00_model_states.pt"
    before = _tensors(torch.load(states, weights_only=False))
    flip_inside_largest_tensor(states)
    after = _tensors(torch.load(states, weights_only=False))  # still a readable file, one tensor changed
    assert len(before) == len(after) and sum(not torch.equal(a, b) for a, b in zip(before, after)) == 1
    manifest = tags.read_manifest(bad)
    assert all(e.sha256 and len(e.sha256) == 64 for e in manifest.values())
    with caplog.at_level(logging.WARNING, logger=tags.__name__):
        assert tags.resolve_resume("auto", run, tmp_path) == good
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(states) in warned[0] and "bytes changed" in warned[0] and str(good) in warned[0]
    err = _error_of(ckpt.Checkpointer.load, engine, bad)
    assert isinstance(err, safe_load.DamagedCheckpointError) and str(states) in _one_line(str(err))


def test_an_unchanged_tag_is_unpickled_once_and_a_changed_one_again(engine0, tmp_path, monkeypatch):
    engine, cfg = engine0
    tag = ckpt.Checkpointer(tmp_path / "run", keep_last=3, is_main=True).save(engine, 1, client_state(cfg))
    loads = []
    real = tags._quick_load
    monkeypatch.setattr(tags, "_quick_load", lambda path: loads.append(path) or real(path))
    for _ in range(3):  # preflight, run-directory choice, load: one resume
        tags.verify_tag(tag)
    once = len(loads)
    assert once >= 1
    states = tag / "mp_rank_00_model_states.pt"
    _damage(states, "zeroed")  # same size, new content
    os.utime(states, ns=(states.stat().st_atime_ns, states.stat().st_mtime_ns + 1_000_000_000))
    with pytest.raises(safe_load.CheckpointError):
        tags.verify_tag(tag)
    assert len(loads) == once + 1


def test_all_checkpoints_damaged_is_an_error_not_a_fresh_start(engine0, tmp_path):
    engine, cfg = engine0
    run = tmp_path / "run"
    c = ckpt.Checkpointer(run, keep_last=3, is_main=True)
    for step in (1, 2):
        _damage(c.save(engine, step, client_state(cfg)) / "mp_rank_00_model_states.pt", "zeroed")
    err = _error_of(tags.resolve_resume, "auto", run, tmp_path)
    assert isinstance(err, safe_load.DamagedCheckpointError)
    msg = _one_line(str(err))
    assert str(run / "checkpoints") in msg and "step00000001" in msg and "step00000002" in msg
    (run / "checkpoints" / "step00000002" / tags.COMPLETE).write_bytes(bytes(64))  # the marker itself zeroed
    with pytest.raises(safe_load.DamagedCheckpointError, match="damaged completion marker"):
        tags.verify_tag(run / "checkpoints" / "step00000002")


def test_expected_files_follow_deepspeed_naming(tmp_path):
    meta = {"dp_world_size": 2, "mp_world_size": 1, "ds_config": {"zero_optimization": {"stage": 3},
                                                                 "bf16": {"enabled": True}}}
    assert tags.expected_files(meta) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    meta["ds_config"] = {"zero_optimization": {"stage": 0}}
    assert tags.expected_files(meta) == ["mp_rank_00_model_states.pt"]


# ------------------------------------------------------------------ case 8: disk full while saving


class StubEngine:
    """Writes a small valid model-states file, or half of one and then fails like a full disk."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool = True) -> bool:
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        if self.fail is not None:
            (d / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04" + bytes(100))
            raise self.fail
        torch.save({"module": {"w": torch.ones(64)}, "dp_world_size": 1, "mp_world_size": 1,
                    "ds_config": {"zero_optimization": {"stage": 0}}, **client_state},
                   d / "mp_rank_00_model_states.pt")
        return True


Usage = namedtuple("Usage", "total used free")


@pytest.mark.parametrize("exc,free,cause", [
    (RuntimeError("basic_ios::clear: iostream error"), 5 * 2**20, "no space left on the disk"),
    (OSError(errno.ENOSPC, "No space left on device"), 80 * 2**30, "no space left on the disk"),
    (RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed"), 80 * 2**30,
     "the write failed"),
])
def test_disk_full_during_save_is_one_clear_error(tmp_path, monkeypatch, exc, free, cause):
    c = ckpt.Checkpointer(tmp_path / "run", keep_last=2, is_main=True)
    good = c.save(StubEngine(), 1, {"step": 1})
    stale = c.dir / tags.tag_for(2)
    stale.mkdir()
    (stale / tags.COMPLETE).write_text("2\n")  # an earlier save of this step, being overwritten
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: Usage(100 * 2**30, 100 * 2**30 - free, free))
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        c.save(StubEngine(exc), 2, {"step": 2})
    msg = _one_line(str(info.value))
    assert str(c.dir) in msg and str(stale) in msg and cause in msg
    assert (f"{free / 2**20:.1f} MiB free" if free < 2**30 else f"{free / 2**30:.1f} GiB free") in msg
    assert not (stale / tags.COMPLETE).exists()
    assert tags.complete_tags(c.dir) == [good] and tags.resolve_resume("auto", tmp_path / "run", tmp_path) == good
    assert c.last_saved_step == 1


# ------------------------------------------------------------------ case 13: evaluate on the wrong file


def test_evaluate_names_deepspeed_files_and_garbage(engine0, tmp_path, capsys, keep_group):
    engine, cfg = engine0
    run = tmp_path / "run"
    tag = ckpt.Checkpointer(run, keep_last=2, is_main=True).save(engine, 1, client_state(cfg))
    (run / "model_final.pt").write_bytes(b"")  # where the trainer exports; only its existence matters here
    shard = tag / "mp_rank_00_model_states.pt"
    renamed = tmp_path / "weights.pt"
    shutil.copy(shard, renamed)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 20)
    for path, says in ((shard, str(run / "model_final.pt")), (renamed, "DeepSpeed training checkpoint"),
                       (garbage, "expected an exported model such as model_final.pt"), (tag, "is a folder")):
        assert cli.main(["--checkpoint", str(path)]) == 2, path
        err = _one_line(capsys.readouterr().err)
        assert err.startswith("error: ") and str(path) in err and says in err, err
        assert "Please file an issue" not in err and "weights_only` argument" not in err
        assert err == f"error: {_one_line(str(_error_of(export.load_exported, path)))}"  # the one loader's message
