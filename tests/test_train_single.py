"""One-process training through launch/train.py and the Trainer API: frozen-backbone prompt tuning and
the LR groups DeepSpeed actually steps with, SIGTERM checkpointing + resume, non-finite losses skipped
and counted up to a stop with a last good checkpoint, and an exact checkpoint round trip."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mip_dist.config import load_config
from mip_dist.engine.checkpoint import COMPLETE, load_exported
from mip_dist.engine.optim import freeze_backbone, lr_multiplier
from mip_dist.model import build_model, param_category

from test_train_distributed import losses, make_tiny_shards

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "launch" / "train.py")
TIMEOUT = 180


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, make_tiny_shards(root)


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_frozen_backbone_trains_only_prompts_ipg_and_heads(setup):
    root, base = setup
    args = base + ["optim.freeze_backbone=true", "train.epochs=1", "train.run_name=frozen",
                   "optim.prompt_lr_factor=5", "optim.ipg_lr_factor=15", "optim.bias_lr_factor=2",
                   "train.eval_every_epochs=1", "eval.trials=2", "train.best_metric=all_single/mAP"]
    r = subprocess.run([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = root / "runs" / "frozen"
    cfg = load_config(run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)  # the trainer's model init: seed, then build
    blob = load_exported(run_dir / "model_final.pt")
    init = build_model(cfg.model, cfg.attention, blob["num_classes"], blob["num_cameras"]).state_dict()
    final = blob["model"]
    changed = {cat: [] for cat in ("backbone", "prompt", "ipg", "head")}
    for name, p in build_model(cfg.model, cfg.attention, blob["num_classes"], blob["num_cameras"]).named_parameters():
        changed[param_category(name)].append(not torch.equal(init[name], final[name]))
    assert not any(changed["backbone"]), "a backbone parameter moved"
    assert len(changed["backbone"]) > 20
    for cat in ("prompt", "ipg", "head"):
        assert any(changed[cat]), f"no {cat} parameter was trained"

    # the optimizer DeepSpeed saved: only trainable groups, each at base LR x factor x schedule(step)
    step = 3
    sd = torch.load(run_dir / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt",
                    map_location="cpu", weights_only=False)
    groups = sd["optimizer"]["param_groups"]
    assert {g["name"].split("_")[0] for g in groups} == {"prompt", "ipg", "base"}  # no trainable head bias
    mult = lr_multiplier((step - 1) / 3, cfg.optim)  # LR of the last step taken
    for g in groups:
        factor = {"prompt": 5.0, "ipg": 15.0, "bias": 2.0, "base": 1.0}[g["name"].split("_")[0]]
        assert g["lr_factor"] == factor and g["initial_lr"] == pytest.approx(cfg.optim.lr * factor)
        assert g["lr"] == pytest.approx(cfg.optim.lr * factor * mult)
        assert g["weight_decay"] == (0.0 if g["name"].endswith("no_decay") else cfg.optim.weight_decay)
    model = build_model(cfg.model, cfg.attention, blob["num_classes"], blob["num_cameras"])
    freeze_backbone(model, param_category)
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())

    # the end-of-run evaluation: logged, reported, and tracked as the best checkpoint
    evals = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert len(evals) == 1 and 0 <= evals[0]["all_single/mAP"] <= 100
    summary = json.loads((run_dir / "FINISHED").read_text())
    assert summary["best_metric"] == evals[0]["all_single/mAP"]
    best = load_exported(run_dir / "model_best.pt")
    assert all(torch.equal(best["model"][k], final[k]) for k in final)  # best = the only evaluated state
    # the final evaluation's report sits in the run directory itself
    assert (run_dir / "results.json").is_file() and (run_dir / "cmc.png").is_file() and (run_dir / "loss.png").is_file()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_signal_saves_a_checkpoint_and_resume_finishes(setup, sig):
    """SIGTERM and a first Ctrl-C (SIGINT) both stop at the next step boundary after a checkpoint."""
    root, base = setup
    name = f"stop-{sig.name}"
    run_dir = root / "runs" / name
    args = base + ["train.ckpt_every_steps=0", f"train.run_name={name}"]
    proc = subprocess.Popen([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + TIMEOUT
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.02)
    proc.send_signal(sig)
    out = proc.communicate(timeout=TIMEOUT)[0]
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by a signal: saved" in out and "Traceback" not in out
    steps_done = len(losses(run_dir))
    assert 1 <= steps_done < 6 and not (run_dir / "FINISHED").exists()
    assert (run_dir / "checkpoints" / f"step{steps_done:08d}" / COMPLETE).is_file()

    r = subprocess.run([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args, "--resume", "auto"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step{steps_done:08d}'}" in r.stderr
    assert len(losses(run_dir)) == 6 and (run_dir / "FINISHED").is_file()

    again = subprocess.run([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args], cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert "backend gloo" not in again.stderr  # refused before any process group started


PROBE = textwrap.dedent('''
    """Runs inside its own process: NaN losses injected into a real Trainer, then a checkpoint round trip."""
    import json, sys
    import torch
    from mip_dist.config import load_config
    from mip_dist.engine.distributed import init_distributed, shutdown
    from mip_dist.engine.trainer import Trainer, TrainingDiverged

    overrides, out_path = json.loads(sys.argv[1]), sys.argv[2]
    cfg = load_config("configs/tiny.yaml", overrides)
    env = init_distributed("cpu")
    trainer = Trainer(cfg, env)
    real_loss, calls = trainer.loss_fn, []

    def loss_fn(out, pids, modality, epoch):  # batches 2, 4, 5, 6 give NaN; 1 and 3 are fine
        total, parts = real_loss(out, pids, modality, epoch)
        calls.append(len(calls) + 1)
        return (total * float("nan"), parts) if calls[-1] in (2, 4, 5, 6) else (total, parts)

    trainer.loss_fn = loss_fn
    real_step, pre_step_norms, ds_clips = trainer.engine.step, [], []

    def step():  # the gradients the optimizer is about to apply (DeepSpeed clips inside its step, if it clips)
        grads = [p.grad for p in trainer.engine.module.parameters() if p.grad is not None]
        pre_step_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real_step()

    trainer.engine.step = step
    trainer.engine.clip_fp32_gradients = lambda: ds_clips.append(1)
    result = {}
    try:
        trainer.fit()
    except TrainingDiverged as exc:
        result["error"] = str(exc)
    result.update(step=trainer.step, bad_total=trainer.bad_total, batches=len(calls),
                  backward_allreduce=trainer.engine.enable_backward_allreduce, pre_step_norms=pre_step_norms,
                  deepspeed_clips=len(ds_clips))
    live = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    tag = trainer.checkpointer.dir / f"step{trainer.step:08d}"
    saved = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    result["weights_equal_checkpoint"] = all(torch.equal(live[k], saved[k]) for k in live)

    # round trip: a fresh engine loaded from that tag holds exactly the same weights and optimizer state
    def opt_state(t):
        opt = t.engine.optimizer
        return [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]
                if "momentum_buffer" in opt.state[p]]

    mom = opt_state(trainer)
    again = Trainer(cfg, env, resume=str(tag))
    sd = again.engine.module.state_dict()
    result["round_trip_weights"] = sd.keys() == live.keys() and all(torch.equal(sd[k], live[k]) for k in live)
    mom2 = opt_state(again)
    result["round_trip_momentum"] = len(mom) == len(mom2) > 0 and all(torch.equal(a, b) for a, b in zip(mom, mom2))
    result["round_trip_position"] = [again.step, again.epoch, again.micro_in_epoch, again.bad_total]
    json.dump(result, open(out_path, "w"))
    shutdown()
''')


PROBE_CLIP = 0.001  # far below the tiny model's gradient norm: every step clips


@pytest.fixture(scope="module")
def probe(setup):
    root, base = setup
    script = root / "probe.py"
    script.write_text(PROBE)
    out = root / "probe.json"
    args = base + ["train.max_bad_steps=2", "train.run_name=nan", f"optim.grad_clip={PROBE_CLIP}"]
    r = subprocess.run([sys.executable, str(script), json.dumps(args), str(out)], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text()), root / "runs" / "nan", r.stderr


def test_non_finite_losses_are_skipped_counted_and_stop_the_run(probe):
    result, run_dir, log = probe
    # batch 1 ok (step 1), 2 NaN (skipped), 3 ok (step 2, epoch end), 4-6 NaN: 3 in a row > max_bad_steps=2
    assert result["batches"] == 6 and result["step"] == 2 and result["bad_total"] == 4
    assert "3 non-finite losses in a row (train.max_bad_steps=2)" in result["error"]
    assert f"last good checkpoint: {run_dir / 'checkpoints' / 'step00000002'}" in result["error"]
    assert result["weights_equal_checkpoint"]  # skipped batches never touched the weights
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["train", "train", "abort"] and recs[-1]["bad_steps_total"] == 4
    assert "non-finite loss at step 1 (epoch 0): batch skipped (1 in a row, 1 total)" in log


def test_one_rank_without_zero_skips_the_gradient_all_reduce(probe):
    result, _, _ = probe  # a no-op on one rank; two-rank runs (test_train_distributed) still average gradients
    assert result["backward_allreduce"] is False


def test_fp32_without_zero_clips_once_in_the_trainer_with_the_logged_norm(probe):
    result, run_dir, _ = probe  # DeepSpeed's own fp32 clipping would take the same norm again, looped
    assert result["deepspeed_clips"] == 0 and len(result["pre_step_norms"]) == 2
    assert all(n <= PROBE_CLIP * 1.0001 for n in result["pre_step_norms"]), result["pre_step_norms"]
    logged = [json.loads(l)["grad_norm"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()[:2]]
    assert all(n > 100 * PROBE_CLIP for n in logged)  # the norm before clipping, as DeepSpeed reports under ZeRO


def test_checkpoint_round_trip_is_exact(probe):
    result, _, _ = probe
    assert result["round_trip_weights"] and result["round_trip_momentum"]
    assert result["round_trip_position"] == [2, 1, 0, 1]  # saved at step 2 = start of epoch 1, 1 bad batch then


def test_gradient_accumulation_steps_once_per_cycle(setup):
    root, base = setup
    args = base + ["train.grad_accum=2", "data.steps_per_epoch=5", "train.epochs=1", "train.run_name=accum"]
    r = subprocess.run([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "using 4 of 5 batches per epoch (a multiple of train.grad_accum=2)" in r.stderr
    run_dir = root / "runs" / "accum"
    assert len(losses(run_dir)) == 2  # 4 micro-batches -> 2 optimizer steps
    assert json.loads((run_dir / "FINISHED").read_text())["step"] == 2
    state = torch.load(run_dir / "checkpoints" / "step00000002" / "mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)
    assert state["global_steps"] == 2 and state["micro_in_epoch"] == 0 and state["epoch"] == 1


def test_bf16_run_exports_fp32_master_weights(setup):
    """bf16 without ZeRO: BatchNorm buffers follow the 16-bit dtype, the export holds the fp32 masters."""
    root, base = setup
    args = base + ["train.precision=bf16", "train.epochs=1", "train.run_name=bf16"]
    r = subprocess.run([sys.executable, TRAIN, "--config", "configs/tiny.yaml", *args], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr[-4000:]
    run_dir = root / "runs" / "bf16"
    assert all(torch.isfinite(torch.tensor(losses(run_dir))))
    final = load_exported(run_dir / "model_final.pt")["model"]
    trained = final["mpl.bank"]
    assert trained.dtype == torch.float32
    assert not torch.equal(trained, trained.bfloat16().float())  # finer than bf16: the fp32 master copy
