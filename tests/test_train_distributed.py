"""Two-rank CPU training (gloo) through the real launchers: `deepspeed` with ZeRO 0-3, `accelerate launch`
on one node and as a 2-node x 1-process job on loopback, and a SIGKILLed run resumed with --resume auto.

Every run trains the same tiny model on the same synthetic shards for 6 steps (2 epochs, MSEL on from
epoch 1), logging every step, so the per-step losses in metrics.jsonl must agree across all of them.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mip_dist.config import load_config
from mip_dist.engine.checkpoint import COMPLETE, load_exported
from mip_dist.engine.ds_config import build_ds_config
from mip_dist.engine.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TRAIN = str(REPO / "launch" / "train.py")
STEPS = 6
TIMEOUT = 240


def tiny_overrides(root: Path) -> list[str]:
    """The tiny config shrunk further: depth 3, width 64, 64x32 images, batch 8, 3 steps x 2 epochs, on a
    synthetic set of 8 training identities (2 images per camera) under `root`."""
    return ["model.depth=3", "model.embed_dim=64", "model.num_heads=4", "model.img_size=[64,32]",
            "data.img_size=[64,32]", "data.batch_size=8", "data.num_instances=2", "data.workers=0",
            f"data.root={root / 'synthetic'}", f"data.shards={root / 'shards'}", "data.synthetic_ids=8",
            "data.synthetic_test_ids=4", "data.synthetic_images_per_camera=2", "data.steps_per_epoch=3",
            "train.epochs=2", "train.log_every=1", "train.ckpt_every_steps=2", "train.keep_last=2",
            "train.eval_every_epochs=0", "train.precision=fp32", "train.device=cpu",
            f"train.output_dir={root / 'runs'}", "optim.warmup_epochs=0", "optim.lr=0.01", "loss.msel_start_epoch=1"]


def make_tiny_shards(root: Path, extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Write the synthetic set and its shards once (what launch/train.py would otherwise make on demand);
    returns the run overrides that use them (`extra` overrides the generator's settings)."""
    from mip_dist.demo.prepare import ensure_synthetic_shards

    overrides = tiny_overrides(root) + list(extra)
    ensure_synthetic_shards(load_config(REPO / "configs" / "tiny.yaml", overrides).data, workers=1, progress=False)
    return overrides


def losses(run_dir: Path) -> list[float]:
    """Per-step total loss from metrics.jsonl (one record per step)."""
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r.get("kind") == "train"]
    assert [r["step"] for r in recs] == list(range(1, len(recs) + 1)), "one record per step, in order"
    return [r["loss"] for r in recs]


def launch(cmd: list[str], timeout: int = TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a launcher command; fail with its output tail if it does not exit 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd[:6])} ... exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def deepspeed_cmd(args: list[str]) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), TRAIN,
            "--config", "configs/tiny.yaml", *args]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return root, make_tiny_shards(root)


@pytest.fixture(scope="module")
def zero_runs(setup):
    """One deepspeed 2-rank run per ZeRO stage; ZeRO-3 via a JSON config that partitions every parameter."""
    root, base = setup
    ds3 = build_ds_config(load_config(REPO / "configs" / "tiny.yaml", base + ["train.zero_stage=3"]), 2)
    ds3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # no small-param shortcut
    ds3["zero_optimization"]["stage3_prefetch_bucket_size"] = 0  # gathered means needed now: no prefetch,
    ds3["zero_optimization"]["stage3_max_reuse_distance"] = 0  # and no keeping for a later reuse
    (root / "zero3.json").write_text(json.dumps(ds3))
    runs = {}
    for stage in range(4):
        extra = [f"train.zero_stage={stage}", f"train.run_name=zero{stage}"]
        cmd, env = deepspeed_cmd(base + extra), None
        if stage == 3:  # through the residency probe
            cmd.append(f"train.deepspeed_config={root / 'zero3.json'}")
            cmd[cmd.index(TRAIN)] = str(REPO / "tests" / "zero3_probe.py")
            env = {"ZERO3_PROBE_OUT": str(root / "zero3_probe"), "PYTHONPATH": str(REPO / "tests")}
        launch(cmd, env=env)
        runs[stage] = root / "runs" / f"zero{stage}"
    return runs


def test_zero3_keeps_parameters_partitioned(zero_runs):
    """Each rank holds half of the parameter elements between steps, and a block's forward sees only a
    small part of the model gathered (old code: every parameter, for the whole step)."""
    probes = [json.loads((zero_runs[3].parent.parent / "zero3_probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for probe in probes:
        assert len(probe["after_step"]) == STEPS
        for after in probe["after_step"]:
            assert 0.45 <= after["partition"] <= 0.55, after
            assert after["available"] <= 0.1, after
        assert max(probe["block_forward"]) <= 0.3, max(probe["block_forward"])


def test_zero_stages_give_the_same_losses(zero_runs):
    ref = losses(zero_runs[0])
    assert len(ref) == STEPS and ref[0] > ref[-1], ref  # it trains
    for stage in (1, 2, 3):
        assert losses(zero_runs[stage]) == pytest.approx(ref, rel=1e-5, abs=1e-6), f"ZeRO-{stage}"
    # MSEL switches on at epoch 1 (step 4), not before
    recs = [json.loads(l) for l in (zero_runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert all(r["msel"] == 0 for r in recs[:3]) and all(r["msel"] > 0 for r in recs[3:])
    assert all(r["img_s"] > 0 and 0 <= r["data_wait"] <= 1 and r["grad_norm"] > 0 for r in recs)


def test_zero_runs_export_the_same_fp32_model(zero_runs):
    from mip_dist.config import from_dict
    from mip_dist.model import build_model

    blobs = [load_exported(zero_runs[s] / "model_final.pt") for s in range(4)]
    ref = blobs[0]["model"]
    for stage, blob in enumerate(blobs[1:], start=1):
        assert blob["model"].keys() == ref.keys(), f"ZeRO-{stage}"
        for k, v in ref.items():
            assert torch.allclose(blob["model"][k].float(), v.float(), rtol=1e-4, atol=1e-6), (stage, k)
    cfg = from_dict(blobs[3]["config"])
    model = build_model(cfg.model, cfg.attention, blobs[3]["num_classes"], blobs[3]["num_cameras"])
    model.load_state_dict(blobs[3]["model"])  # strict: the ZeRO-3 export is a complete model
    assert (zero_runs[3] / "FINISHED").is_file() and (zero_runs[3] / "config.yaml").is_file()
    kept = sorted(p.name for p in (zero_runs[3] / "checkpoints").iterdir() if (p / COMPLETE).is_file())
    assert kept == ["step00000004", "step00000006"]  # keep_last=2
    assert any((zero_runs[3] / "tb").iterdir())


def test_accelerate_launch_two_processes_matches_deepspeed(setup, zero_runs):
    root, base = setup
    launch([str(BIN / "accelerate"), "launch", "--config_file", "configs/accelerate/single_node.yaml",
            "--num_processes", "2", "--main_process_port", str(free_port()), TRAIN, "--config",
            "configs/tiny.yaml", *base, "train.run_name=accel"])
    assert losses(root / "runs" / "accel") == pytest.approx(losses(zero_runs[0]), rel=1e-5, abs=1e-6)


def test_two_node_accelerate_job_on_loopback(setup, zero_runs):
    root, base = setup
    port = str(free_port())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([str(BIN / "accelerate"), "launch", "--config_file",
                               "configs/accelerate/multi_node.yaml", "--num_processes", "2", "--num_machines", "2",
                               "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                               "--main_process_port", port, TRAIN, "--config", "configs/tiny.yaml", *base,
                               "train.run_name=twonode", "train.zero_stage=1"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    try:
        outs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-5000:]
    assert "rank 0/2 (local 0)" in outs[0]  # each "node" holds one process of a 2-process job
    assert losses(root / "runs" / "twonode") == pytest.approx(losses(zero_runs[0]), rel=1e-5, abs=1e-6)


def test_sigkill_then_resume_auto_repeats_the_uninterrupted_run(setup, zero_runs):
    """ZeRO-2, 2 ranks: SIGKILL the whole job after its first checkpoint, resume, compare every step."""
    root, base = setup
    run_dir = root / "runs" / "killed"
    args = base + ["train.zero_stage=2", "train.run_name=killed"]
    proc = subprocess.Popen(deepspeed_cmd(args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + TIMEOUT
    try:
        while not (run_dir / "checkpoints" / "step00000002" / COMPLETE).is_file():
            assert proc.poll() is None, "run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # launcher and both ranks, no chance to clean up
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (run_dir / "FINISHED").exists(), "killed too late to test anything"
    done_before = len(losses(run_dir))
    assert done_before < STEPS

    launch(deepspeed_cmd(args + ["--resume", "auto"]))
    resumed = losses(run_dir)
    assert len(resumed) == STEPS
    assert resumed == pytest.approx(losses(zero_runs[2]), rel=1e-6, abs=1e-7)
    assert (run_dir / "FINISHED").is_file()


def test_a_stopped_rank_ends_the_job_after_the_collective_timeout(setup):
    """SIGSTOP one rank mid-training: the other rank's next collective fails after
    train.collective_timeout_s (here 10 s) and the launcher ends the job, instead of blocking for good."""
    root, base = setup
    run_dir = root / "runs" / "hung"
    args = base + ["train.run_name=hung", "train.epochs=50", "train.collective_timeout_s=10"]
    proc = subprocess.Popen(deepspeed_cmd(args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + TIMEOUT
    stopped = None
    try:
        while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.05)
        ranks = subprocess.run(["pgrep", "-s", str(proc.pid), "-f", "local_rank=1"], capture_output=True,
                               text=True).stdout.split()
        assert ranks, "rank 1 not found"
        stopped = int(ranks[0])
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.time()
        out = proc.communicate(timeout=180)[0]
        waited = time.time() - t0
    finally:
        if stopped is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stopped, signal.SIGCONT)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode != 0 and not (run_dir / "FINISHED").exists()
    assert 8 <= waited <= 120, waited  # the 10 s timeout, not DeepSpeed's default 10 minutes
    assert "timed out" in out.lower() or "timeout" in out.lower(), out[-3000:]
