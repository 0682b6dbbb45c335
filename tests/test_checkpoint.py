"""Checkpoint bookkeeping without a process group: tags, resume lookup, pruning, RNG, export, metrics truncation."""
import json
import random
import time

import numpy as np
import pytest
import torch

from mip_dist.config import load_config, to_dict
from mip_dist.engine import checkpoint as ckpt, export, tags
from mip_dist.engine.metrics_log import MetricsLogger, truncate_jsonl
from mip_dist.engine.trainer import FINISHED, RunDirError, resolve_run_dir


def _fake_tag(ckpt_dir, step, complete=True):
    tag = ckpt_dir / tags.tag_for(step)
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag / tags.COMPLETE).write_text(f"{step}\n")
    return tag


def test_tags_sort_and_half_written_ones_are_ignored(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    for s in (2, 10, 4):
        _fake_tag(d, s)
    _fake_tag(d, 12, complete=False)  # killed while writing
    assert [tags.step_of(t) for t in tags.complete_tags(d)] == [2, 4, 10]
    assert tags.latest_tag(d).name == "step00000010"
    assert tags.resolve_resume("auto", tmp_path / "run", tmp_path) == d / "step00000010"
    assert tags.resolve_resume(str(tmp_path / "run"), None, tmp_path) == d / "step00000010"
    assert tags.resolve_resume(str(d / "step00000004"), None, tmp_path) == d / "step00000004"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        tags.resolve_resume(str(d / "step00000012"), None, tmp_path)
    with pytest.raises(FileNotFoundError, match="no such"):
        tags.resolve_resume(str(tmp_path / "nope"), None, tmp_path)


def test_resume_auto_without_run_name_picks_newest_run(tmp_path):
    assert tags.resolve_resume("auto", None, tmp_path) is None
    _fake_tag(tmp_path / "a" / "checkpoints", 8)
    time.sleep(0.02)
    newer = _fake_tag(tmp_path / "b" / "checkpoints", 2)
    assert tags.resolve_resume("auto", None, tmp_path) == newer


def test_prune_keeps_last_k(tmp_path):
    run = tmp_path / "run"
    c = ckpt.Checkpointer(run, keep_last=2, is_main=True)
    for s in (1, 2, 3, 4):
        _fake_tag(c.dir, s)
    c._prune()
    assert [t.name for t in tags.complete_tags(c.dir)] == ["step00000003", "step00000004"]


def test_rng_round_trip_is_exact():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = ckpt.capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.restore_rng(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_export_round_trip(tmp_path):
    cfg = load_config("configs/tiny.yaml")
    sd = {"w": torch.randn(3, 4), "n": torch.tensor(5)}
    path = export.export_model(tmp_path / "model_final.pt", sd, cfg, num_classes=7, num_cameras=6)
    blob = export.load_exported(path)
    assert torch.equal(blob["model"]["w"], sd["w"]) and blob["num_classes"] == 7 and blob["num_cameras"] == 6
    assert blob["config"] == to_dict(cfg)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing config, num_cameras, num_classes"):
        export.load_exported(tmp_path / "other.pt")


def test_metrics_truncated_to_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    assert truncate_jsonl(path, 4) == 4
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3, 4]
    logger = MetricsLogger(tmp_path, enabled=True, resume_step=2)
    logger.write({"kind": "train", "step": 3, "loss": 0.5})
    logger.close()
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
    assert any((tmp_path / "tb").iterdir())  # TensorBoard event file


def test_run_dir_is_never_reused_silently(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"train.output_dir={tmp_path}", "train.run_name=r1"])
    run_dir, tag = resolve_run_dir(cfg, None)
    assert run_dir == tmp_path / "r1" and tag is None
    run_dir.mkdir()
    (run_dir / FINISHED).write_text("{}")
    with pytest.raises(RunDirError, match="already holds a finished run.*--resume auto"):
        resolve_run_dir(cfg, None)
    assert resolve_run_dir(cfg, "auto") == (run_dir, None)  # nothing to resume: continue in place
    tag = _fake_tag(run_dir / "checkpoints", 6)
    assert resolve_run_dir(cfg, "auto") == (run_dir, tag)
    anon = load_config("configs/tiny.yaml", [f"train.output_dir={tmp_path}"])
    first, _ = resolve_run_dir(anon, None)
    first.mkdir()
    second, _ = resolve_run_dir(anon, None)
    assert first != second and first.parent == second.parent == tmp_path
