"""Bad input and faults: config values that would train a broken model, shards that do not fit the run,
labels beyond the index, a run ending with non-finite weights, and the collective timeout."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from mip_dist.config import ConfigError, load_config
from mip_dist.engine import distributed

from test_train_distributed import make_tiny_shards

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    return root, make_tiny_shards(root)


def _train(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override, key", [("optim.lr=.inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
                                           ("optim.lr=1e6", "optim.lr"), ("optim.momentum=1.5", "optim.momentum"),
                                           ("loss.msel_weight=-1", "loss.msel_weight"),
                                           ("loss.label_smoothing=.inf", "loss.label_smoothing"),
                                           ("train.collective_timeout_s=-1", "train.collective_timeout_s")])
def test_non_finite_or_absurd_hyperparameters_are_refused(override, key):
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}: "):
        load_config(REPO / "configs" / "tiny.yaml", [override])


@pytest.mark.parametrize("extra, message", [
    (["data.dataset=sysu"], "data.dataset: 'sysu', but the shards in"),
    (["eval.protocols=[regdb]", "train.eval_every_epochs=1"], "eval.protocols: regdb cannot evaluate synthetic"),
    (["data.batch_size=64"], "data.batch_size: 64 needs 16 identities per batch"),
    (["data.train_urls=/nowhere/train-{000000..000001}.tar", "data.steps_per_epoch=2"], "data.train_urls: "),
])
def test_shards_that_do_not_fit_the_run_fail_before_start_up(setup, extra, message):
    """One `error:` line and exit 2, before the process group (no 'backend gloo' line) or any training."""
    _, base = setup
    r = _train(base + ["train.run_name=misfit"] + extra)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "backend gloo" not in r.stderr


def test_labels_beyond_the_index_name_the_shard_and_sample():
    from mip_dist.data.batch import BatchError, check_batch

    batch = {"pid": torch.tensor([0, 1, 7, 2]), "camera": torch.tensor([0, 1, 0, 1]),
             "modality": torch.tensor([1, 1, 0, 0]),
             "shard": ["s/train-000000.tar"] * 4, "key": [f"k{i}" for i in range(4)]}
    with pytest.raises(BatchError, match=r"'pid' value 7 is outside \[0, 7\).*shard s/train-000000\.tar, sample k2"):
        check_batch(batch, num_classes=7, num_cameras=3)
    good = {**batch, "pid": torch.tensor([0, 1, 6, 2])}
    check_batch(good, num_classes=7, num_cameras=3)
    with pytest.raises(BatchError, match=r"'camera' value 3 .*sample k1"):
        check_batch({**good, "camera": torch.tensor([0, 3, 0, 0])}, num_classes=7, num_cameras=3)
    with pytest.raises(BatchError, match=r"'modality' value 2 .*sample k1"):
        check_batch({**good, "modality": torch.tensor([0, 2, 0, 0])}, num_classes=7, num_cameras=3)


NAN_PROBE = textwrap.dedent('''
    import json, sys
    from mip_dist.config import load_config
    from mip_dist.engine.distributed import init_distributed, shutdown
    from mip_dist.engine.trainer import Trainer, TrainingDiverged

    cfg = load_config("configs/tiny.yaml", json.loads(sys.argv[1]))
    env = init_distributed("cpu")
    trainer = Trainer(cfg, env)
    trainer.engine.module.model.heads[0].bn.running_mean.fill_(float("nan"))  # finite losses, broken weights
    try:
        trainer.fit()
        print(json.dumps({"error": None}))
    except TrainingDiverged as exc:
        print(json.dumps({"error": str(exc)}))
    shutdown(wait=False)
''')


def test_a_run_ending_with_non_finite_weights_is_not_finished(setup):
    root, base = setup
    script = root / "nan_probe.py"
    script.write_text(NAN_PROBE)
    args = base + ["train.run_name=nanweights", "train.epochs=1"]
    r = subprocess.run([sys.executable, str(script), json.dumps(args)], cwd=REPO, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    error = json.loads(r.stdout.strip().splitlines()[-1])["error"]
    assert error and "non-finite values in 1 tensors (heads.0.bn.running_mean)" in error
    run_dir = root / "runs" / "nanweights"
    assert not (run_dir / "FINISHED").exists() and not (run_dir / "model_final.pt").exists()


def test_collective_timeout_defaults_per_device_and_reaches_the_process_group(monkeypatch):
    assert distributed.collective_timeout(0, torch.device("cpu")) == timedelta(seconds=300)
    assert distributed.collective_timeout(0, torch.device("cuda", 0)) == timedelta(seconds=600)
    assert distributed.collective_timeout(42, torch.device("cpu")) == timedelta(seconds=42)
    import deepspeed

    seen = {}
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: seen.update(kw))
    env = {k: v for k, v in distributed.os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    monkeypatch.setattr(distributed.os, "environ", {**env, "OMP_NUM_THREADS": "1"})  # a single-process launch
    from torch.distributed import distributed_c10d

    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # restored after the test
        monkeypatch.setattr(distributed_c10d, name, getattr(distributed_c10d, name))
    distributed.init_distributed("cpu", timeout_s=17)
    assert seen["timeout"] == timedelta(seconds=17) and seen["dist_backend"] == "gloo"
    # groups DeepSpeed creates later (data parallel) get it too, not torch's 30-minute default
    assert distributed_c10d._get_default_timeout("gloo") == timedelta(seconds=17)


COMM_OP_PROBE = textwrap.dedent('''
    import json
    import deepspeed.comm.comm as ds_comm
    from mip_dist.engine.distributed import init_distributed, shutdown

    init_distributed("cpu")
    print(json.dumps({"shm_op": ds_comm.cdb.shm_comm_op is not None}))
    shutdown(wait=False)
''')


def test_cpu_ranks_do_not_compile_deepspeeds_inference_comm_op(tmp_path):
    """The shared-memory op serves only inference_all_reduce; compiling it cost a fresh demo about 40 s."""
    script = tmp_path / "comm_op_probe.py"
    script.write_text(COMM_OP_PROBE)
    env = {k: v for k, v in distributed.os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env={**env, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"shm_op": False}
    assert "shm_comm_op built" not in r.stdout + r.stderr
