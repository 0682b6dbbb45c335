"""The embedded demo: end to end at reduced size (data made on demand, training, evaluation, artefacts),
validation without side effects, the ablation's two runs in one table, and the core not depending on it."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mip_dist.config import load_config
from mip_dist.demo.ablation import AblationError, run_ablation
from mip_dist.demo.people import SYSU_STYLES

REPO = Path(__file__).resolve().parent.parent
TEST_IDS = 8  # chance Rank-1 = 1/8; 2,025 steps of the demo's model reach about 3x that (35% measured)


def test_demo_end_to_end_at_reduced_size(tmp_path):
    overrides = [f"data.root={tmp_path}/synthetic", f"data.shards={tmp_path}/shards", f"train.output_dir={tmp_path}/runs",
                 "data.synthetic_ids=40", f"data.synthetic_test_ids={TEST_IDS}", "data.synthetic_images_per_camera=3",
                 "train.epochs=45", "optim.restart_epochs=45", "train.eval_every_epochs=45", "eval.trials=3",
                 "train.log_every=10"]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/demo.yaml", *overrides], cwd=REPO,
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "preparing the synthetic visible-infrared set" in r.stderr  # logged by rank 0
    assert re.search(r"measured [\d.]+ img/s over the first 30 steps: about [\d.]+ min for the", r.stderr)
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


def _train_module():
    """launch/train.py as a module (its functions run in this process)."""
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "launch" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_validation_writes_nothing_and_preparation_makes_the_demo_data(tmp_path):
    train = _train_module()
    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"data.root={tmp_path}/syn", f"data.shards={tmp_path}/shards", f"train.output_dir={tmp_path}/runs",
        "data.synthetic_ids=8", "data.synthetic_test_ids=2", "data.synthetic_images_per_camera=1"])
    train.preflight(cfg, 1, None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no data, no shards, no run directory
    train.prepare(cfg, 1)
    assert (tmp_path / "shards" / "index.json").is_file() and (tmp_path / "syn" / ".synthetic.json").is_file()


FAKE_TRAINING = """
import json, sys
from pathlib import Path
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
baseline = args.get("model.use_mpl") == "false"
if baseline and "fail" in args.get("train.output_dir", ""):
    sys.exit(3)
run = Path(args["train.output_dir"]) / args["train.run_name"]
run.mkdir(parents=True)
res = {"trials": 1, "R1": 10.0 if baseline else 20.0, "R10": 50.0, "R20": 60.0, "mAP": 9.0, "mINP": 8.0}
(run / "results.json").write_text(json.dumps({"results": {"all_single": res, "indoor_single": res, "note": 1}}))
"""


def test_ablation_trains_baseline_then_mip_and_tables_both(tmp_path):
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAINING)
    config = str(REPO / "configs" / "demo_ablation.yaml")
    table = run_ablation([sys.executable, str(fake)], config, [f"train.output_dir={tmp_path}/runs"])
    rows = [line.split()[:3] for line in table.splitlines()[2:]]
    assert rows == [["baseline:all_single", "1", "10.00"], ["mip:all_single", "1", "20.00"],
                    ["baseline:indoor_single", "1", "10.00"], ["mip:indoor_single", "1", "20.00"]]
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "runs").iterdir()) == ["baseline", "mip"]
    with pytest.raises(AblationError, match="the baseline run exited with code 3") as err:
        run_ablation([sys.executable, str(fake)], config, [f"train.output_dir={tmp_path}/fail"])
    assert err.value.code == 3 and not (tmp_path / "fail").exists()  # MIP is not trained after a failed baseline


def test_core_packages_do_not_import_the_demo():
    core = [p for p in (REPO / "mip_dist").rglob("*.py") if "demo" not in p.relative_to(REPO / "mip_dist").parts]
    users = [str(p.relative_to(REPO)) for p in core
             if re.search(r"^\s*(from|import)\s+(mip_dist\.demo|\.+demo)\b", p.read_text(), re.MULTILINE)]
    assert core and not users, f"the core imports the demo: {users}"


def test_demo_benchmark_times_variants_side_by_side():
    """launch/bench_demo.py: one line per variant, img/s, the ratio to the first, the schedule's length."""
    r = subprocess.run([sys.executable, "launch/bench_demo.py", "--rounds", "1", "--steps", "1", "--warmup", "0",
                        "--threads", "1", "--variant", "base", "--variant", "short: train.epochs=2 data.batch_size=8"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line for line in r.stdout.splitlines() if "img/s" in line]
    assert len(lines) == 2 and "x1.00 vs base" in lines[0], r.stdout
    demo = load_config(REPO / "configs" / "demo.yaml")
    images = demo.data.synthetic_ids * len(SYSU_STYLES) * demo.data.synthetic_images_per_camera
    assert f"{demo.train.epochs * (images // demo.data.batch_size)} steps of {demo.data.batch_size}" in lines[0]
    assert f"{2 * (images // 8)} steps of 8" in lines[1]


def test_demo_data_benchmark_times_the_cache_and_the_batched_augmentation(tmp_path):
    """launch/bench_demo.py --data: the stream without and with its cache, torchvision's per-image chain and
    TrainAugment, each with its ratio to the first of its pair."""
    r = subprocess.run([sys.executable, "launch/bench_demo.py", "--data", "--data-root", str(tmp_path), "--rounds",
                        "1", "--batches", "2", "--threads", "1"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line.strip() for line in r.stdout.splitlines() if "ms/batch" in line]
    assert [line.split(":")[0] for line in lines] == ["stream, no cache", "stream, data.cache_mb=256",
                                                      "augment, torchvision per image", "augment, TrainAugment"]
    assert "x1.00 vs the first" in lines[0] and "x1.00 vs the first" in lines[2]


def test_demo_stem_benchmark_times_both_layouts():
    """launch/bench_demo.py --stem: the conv stem on NCHW and on channels-last input, each as a share of NCHW's."""
    r = subprocess.run([sys.executable, "launch/bench_demo.py", "--stem", "--rounds", "1", "--steps", "1",
                        "--warmup", "0", "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = [line.strip() for line in r.stdout.splitlines() if " ms " in line]
    assert [line.split(":")[0] for line in lines] == ["NCHW", "channels-last"], r.stdout
    assert "x1.00 of NCHW's time" in lines[0]
