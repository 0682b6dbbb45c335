"""Mean ± std over splits (RegDB / LLCM style): the numbers, the table, and evaluate.py's multi-split results.json."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mip_dist.eval.report import aggregate_splits, format_table

from conftest import load_launch_script
from test_cli_errors import _regdb_checkpoint, regdb_split2_shards  # noqa: F401 - fixture reused

ROOT = Path(__file__).resolve().parents[1]


def _split(r1: float, map_: float, minp: float, trials: int = 1) -> dict:
    """One split's evaluate_features-style result with two settings (the second a copy shifted by 10)."""
    def one(shift: float) -> dict:
        res = {"R1": r1 + shift, "R5": r1 + shift + 1, "R10": r1 + shift + 2, "R20": r1 + shift + 3,
               "mAP": map_ + shift, "mINP": minp + shift, "trials": trials, "cmc": [r1 + shift] * 20,
               "description": "d", "headline": True}
        res.update({f"{k}_std": 0.0 for k in ("R1", "R5", "R10", "R20", "mAP", "mINP")})
        return res
    return {"visible_to_thermal": one(0.0), "thermal_to_visible": one(10.0), "visible_to_thermal/R1": r1}


def test_aggregate_numbers_worked_out():
    # R1 over three splits: 80, 84, 86 -> mean 250/3 = 83.333..., population std
    # sqrt(((80-83.33)^2 + (84-83.33)^2 + (86-83.33)^2) / 3) = sqrt(56/9) = 2.4944
    agg = aggregate_splits([_split(80, 70, 50), _split(84, 74, 52), _split(86, 78, 57)])
    v2t = agg["visible_to_thermal"]
    assert v2t["splits"] == 3
    assert v2t["R1"] == pytest.approx(250 / 3) and v2t["R1_std"] == pytest.approx(np.sqrt(56 / 9))
    assert v2t["mAP"] == pytest.approx(74.0) and v2t["mAP_std"] == pytest.approx(np.sqrt(32 / 3))
    assert v2t["mINP"] == pytest.approx(53.0) and v2t["mINP_std"] == pytest.approx(np.sqrt(26 / 3))
    assert v2t["per_split"]["R1"] == [80.0, 84.0, 86.0]
    assert v2t["cmc"] == pytest.approx([250 / 3] * 20)
    assert agg["thermal_to_visible"]["R1"] == pytest.approx(250 / 3 + 10)
    assert agg["visible_to_thermal/mAP"] == pytest.approx(74.0)
    table = format_table(agg)
    assert table.splitlines()[0].split()[:2] == ["setting", "splits"]
    assert "83.33 ± 2.49" in table


def test_settings_missing_from_a_split_are_left_out():
    a, b = _split(80, 70, 50), _split(90, 70, 50)
    del b["thermal_to_visible"]
    assert set(k for k, v in aggregate_splits([a, b]).items() if isinstance(v, dict)) == {"visible_to_thermal"}


def test_evaluate_cli_several_pairs_writes_per_split_and_aggregate(tmp_path, regdb_split2_shards, capsys,
                                                                   monkeypatch):
    cli = load_launch_script("evaluate", "cli_evaluate_agg")
    figures = iter([_split(80, 70, 50), _split(84, 74, 52), _split(86, 78, 57)])
    seen = []

    def fake_job(job, args, out, world):
        """Stands in for feature extraction + metrics: returns the next split's figures."""
        seen.append((Path(job.checkpoint).name, str(job.cfg.data.shards), out.name))
        return next(figures)

    monkeypatch.setattr(cli, "evaluate_job", fake_job)
    runs = []
    for i in (1, 2, 3):
        run = tmp_path / f"regdb_run{i}"
        run.mkdir()
        _regdb_checkpoint(run / "model_best.pt", 2, regdb_split2_shards)
        runs.append(run)
    out = tmp_path / "agg"
    assert cli.main(["--runs", str(tmp_path / "regdb_run*"), "--out", str(out), "--device", "cpu"]) == 0
    assert [s[0] for s in seen] == ["model_best.pt"] * 3 and [s[2] for s in seen] == [  # named by the split held
        "split02_regdb_run1", "split02_regdb_run2", "split02_regdb_run3"]
    printed = capsys.readouterr().out
    assert "mean ± std over splits 2, 2, 2 (n=3)" in printed and "83.33 ± 2.49" in printed
    doc = json.loads((out / "results.json").read_text())
    assert [s["results"]["visible_to_thermal"]["R1"] for s in doc["splits"]] == [80, 84, 86]
    assert doc["splits"][0]["meta"]["checkpoint"] == str((runs[0] / "model_best.pt").resolve())
    assert doc["splits"][0]["meta"]["regdb_split"] == 2
    assert doc["aggregate"]["visible_to_thermal"]["R1"] == pytest.approx(250 / 3)
    assert doc["aggregate"]["visible_to_thermal"]["R1_std"] == pytest.approx(np.sqrt(56 / 9))
    # explicit --checkpoint/--shards pairs take the same path
    figures = iter([_split(80, 70, 50), _split(90, 70, 50)])
    seen.clear()
    ck = [str(r / "model_best.pt") for r in runs[:2]]
    assert cli.main(["--checkpoint", ck[0], "--shards", str(regdb_split2_shards), "--checkpoint", ck[1],
                     "--shards", str(regdb_split2_shards), "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["aggregate"]["visible_to_thermal"]["R1"] == 85.0
