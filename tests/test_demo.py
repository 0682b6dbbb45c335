"""The embedded demo end to end at reduced size: data made on demand, training, evaluation, artefacts."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST_IDS = 8  # chance Rank-1 = 1/8; 990 steps of the demo's model reach about 3x that (41% measured)


def test_demo_end_to_end_at_reduced_size(tmp_path):
    overrides = [f"data.root={tmp_path}/synthetic", f"data.shards={tmp_path}/shards", f"train.output_dir={tmp_path}/runs",
                 "data.synthetic_ids=40", f"data.synthetic_test_ids={TEST_IDS}", "data.synthetic_images_per_camera=3",
                 "train.epochs=45", "optim.restart_epochs=45", "train.eval_every_epochs=45", "eval.trials=3",
                 "train.log_every=10"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/demo.yaml", *overrides], cwd=REPO,
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "preparing the synthetic visible-infrared set" in r.stdout
    assert "all_single" in r.stdout and "indoor_single" in r.stdout  # the printed results table
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    for name in ("config.yaml", "metrics.jsonl", "results.json", "loss.png", "cmc.png", "model_final.pt", "FINISHED"):
        assert (run_dir / name).is_file(), f"the demo left no {name}"
    assert list((run_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    results = json.loads((run_dir / "results.json").read_text())["results"]
    for setting in ("all_single", "indoor_single"):
        res = results[setting]
        assert res["trials"] == 3 and 0.0 <= res["R1"] <= res["R10"] <= res["R20"] <= 100.0
        assert 0.0 < res["mAP"] <= 100.0
    chance = 100.0 / TEST_IDS
    assert results["all_single"]["R1"] >= 2 * chance, f"all-search Rank-1 {results['all_single']['R1']:.1f}% is " \
        f"not well above chance ({chance:.1f}%)"
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ids = [rec["id"] for rec in losses if "id" in rec]
    assert len(ids) >= 6 and sum(ids[-3:]) < 0.5 * sum(ids[:3]), "the ID loss did not fall"

    # a second start never touches the finished run: it opens a new run directory
    r2 = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/demo.yaml", *overrides,
                         "train.epochs=1", "optim.restart_epochs=1"], cwd=REPO, capture_output=True, text=True,
                        timeout=900, env=env)
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert len([p for p in (tmp_path / "runs").iterdir() if p.is_dir()]) == 2
    assert json.loads((run_dir / "results.json").read_text())["results"]["all_single"] == results["all_single"]
