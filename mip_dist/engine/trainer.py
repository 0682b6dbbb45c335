"""One Trainer: builds model, data stream, loss and DeepSpeed engine, then trains with logging,
checkpoints, resume, periodic evaluation (engine/validation.py) and fault handling."""
from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import deepspeed
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mip_dist.config import Config, from_dict, save_config, to_dict
from mip_dist.data.batch import check_batch
from mip_dist.data.sources import dataset_identity
from mip_dist.data.stream import TrainStream, build_train_stream
from mip_dist.eval.report import plot_loss_curve
from mip_dist.losses import MIPLoss
from mip_dist.model import build_model, param_category

from . import checkpoint as ckpt
from .distributed import (DistEnv, all_gather_object, all_reduce_sum, barrier, broadcast_object, peers_named,
                          to_host)
from .ds_config import load_ds_config
from .metrics_log import MetricsLogger, StepTimer, format_train_record
from .optim import build_optimizer, build_param_groups, freeze_backbone, set_lr
from .run_checks import check_data_for_run, check_resume
from .run_dir import FINISHED, RunDirError, agree_run_dir, resolve_run_dir
from .train_utils import (clips_in_trainer, config_diff, grad_norm_stage0, grad_norm_zero, lr_mult, main_thread,
                          non_finite_tensors, read_floats, seed_everything, to_float32)
from .validation import Validator, eval_targets
from .zero import DictOutput

__all__ = ["FINISHED", "RunDirError", "Trainer", "TrainingDiverged", "resolve_run_dir"]

log = logging.getLogger(__name__)
# Steps after which the measured img/s and the ETA are announced once: the first ~10 steps run about 20% slower
# while oneDNN and the allocator warm up, and a 10-step ETA overstated the demo's by 30%.
THROUGHPUT_PROBE_STEPS = 30


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the last good state was saved."""


class Trainer:
    """Trains MIP with a DeepSpeed engine; `fit()` runs to the end (or to SIGTERM) and returns a summary."""

    def __init__(self, cfg: Config, env: DistEnv, resume: Optional[str] = None,
                 allow_config_change: tuple[str, ...] = ()) -> None:
        self.cfg, self.env = cfg, env
        self.is_main = env.is_main
        self.run_dir, resume_tag = agree_run_dir(cfg, resume, self.is_main)  # rank 0 holds its run.lock
        # before the engine: a resume that would change what its steps or weights mean stops here, on every rank
        self.resume_changes = ({} if resume_tag is None else
                               check_resume(cfg, resume_tag, env.world_size, tuple(allow_config_change)))
        self.num_classes, self.num_cameras, self.sources = check_data_for_run(cfg, log_to=log if self.is_main else None)
        seed_everything(cfg.train.seed)  # identical model init on every rank
        self.clip_here = clips_in_trainer(cfg.train.precision, cfg.train.zero_stage)
        self.engine, self.optimizer = self._build_engine()
        self.ds_stage = int(self.engine.zero_optimization_stage())  # bf16 at zero_stage 0 runs as 1 (ds_config)
        self.dtype = (torch.bfloat16 if self.engine.bfloat16_enabled()
                      else torch.float16 if self.engine.fp16_enabled() else torch.float32)
        self.device = self.engine.device
        self.loss_fn = MIPLoss(cfg.loss)
        self.stream = build_train_stream(cfg.data, seed=cfg.train.seed, rank=env.rank, world_size=env.world_size)
        self.accum = cfg.train.grad_accum
        self.micro_per_epoch = self._batches_per_epoch(self.stream)
        self.total_steps = cfg.train.epochs * self.micro_per_epoch // self.accum
        self.checkpointer = ckpt.Checkpointer(self.run_dir, cfg.train.keep_last, self.is_main)

        # training position; replaced by the checkpoint's when resuming
        self.epoch, self.micro_in_epoch, self.bad_total, self.bad_in_row = 0, 0, 0, 0
        self._stop = False
        self._stream_state: Optional[dict] = None
        self.timer: Optional[StepTimer] = None
        self.bar: Optional[tqdm] = None
        self.window: dict[str, list[Any]] = {}
        self._throughput_announced = False
        self.validator = Validator(cfg, eval_targets(cfg, self.sources), self.run_dir, self._fresh_model,
                                   is_main=self.is_main, device=self.device, num_classes=self.num_classes,
                                   num_cameras=self.num_cameras)
        seed_everything(cfg.train.seed + 1_000_003 * (env.rank + 1))  # per-rank dropout / drop-path
        if resume_tag is not None:
            self._restore(resume_tag)
        elif self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        barrier()
        self.metrics = MetricsLogger(self.run_dir, self.is_main,
                                     resume_step=self.step if resume_tag is not None else None)
        if self.is_main:
            log.info("run directory %s; %d steps (%d epochs x %d batches / accum %d); world %d; ZeRO %d; %s",
                     self.run_dir, self.total_steps, cfg.train.epochs, self.micro_per_epoch, self.accum,
                     env.world_size, cfg.train.zero_stage, cfg.train.precision)

    def _fresh_model(self) -> nn.Module:
        """A new model of this run's shape (the evaluator loads consolidated weights into it)."""
        return build_model(self.cfg.model, self.cfg.attention, num_classes=self.num_classes,
                           num_cameras=self.num_cameras)

    def _build_engine(self) -> tuple[Any, torch.optim.Optimizer]:
        """Model (optionally with a frozen backbone), parameter groups, client optimizer, DeepSpeed engine."""
        cfg = self.cfg
        model = self._fresh_model()
        if cfg.model.pretrained:  # before freezing and before the engine copies the weights
            model.load_pretrained(cfg.model.pretrained)
        if cfg.optim.freeze_backbone:
            log.info("prompt tuning: froze %d backbone parameters", freeze_backbone(model, param_category))
        groups = build_param_groups(model.named_parameters(), cfg.optim, param_category)
        ds_config = load_ds_config(cfg, self.env.world_size)
        if self.clip_here:
            ds_config["gradient_clipping"] = 0.0  # _train_step clips with the norm it logs
        engine, optimizer, _, _ = deepspeed.initialize(
            model=DictOutput(model, zero3=cfg.train.zero_stage == 3),
            optimizer=build_optimizer(groups, cfg.optim), config=ds_config)
        if self.env.world_size == 1 and engine.zero_optimization_stage() == 0:
            engine.enable_backward_allreduce = False  # one rank: DeepSpeed would flatten, all-reduce and copy back
            # every gradient for nothing (about 2 ms of the demo's 130 ms step on 2 CPU cores)
        if cfg.train.compile:
            engine.compile()  # torch.compile through DeepSpeed (inductor on the engine's device)
        return engine, optimizer

    def _batches_per_epoch(self, stream: TrainStream) -> int:
        """The stream's batches per epoch, cut to a multiple of grad_accum (accumulation cycles end with the epoch)."""
        stream_steps = int(stream.steps_per_epoch)
        if stream_steps < self.accum:
            raise ValueError(f"train.grad_accum={self.accum} exceeds the {stream_steps} batches per epoch")
        used = stream_steps // self.accum * self.accum
        if used != stream_steps and self.is_main:
            log.info("using %d of %d batches per epoch (a multiple of train.grad_accum=%d)", used, stream_steps,
                     self.accum)
        return used

    # ------------------------------------------------------------------------------------------ state

    @property
    def step(self) -> int:
        """Optimizer steps taken so far (DeepSpeed's counter, restored from checkpoints)."""
        return int(self.engine.global_steps)

    def _client_state(self) -> dict[str, Any]:
        """Everything beyond weights/optimizer that an exact resume needs; per-rank parts gathered."""
        mine = {"rng": ckpt.capture_rng(), "stream": self.stream.state_dict()}
        return {
            "epoch": self.epoch,
            "micro_in_epoch": self.micro_in_epoch,
            "step": self.step,
            **self.validator.state_dict(),
            "bad_steps_total": self.bad_total,
            "world_size": self.env.world_size,
            "ranks": all_gather_object(mine),
            "mip_config": to_dict(self.cfg),
            "datasets": dataset_identity(self.cfg.data),  # by content: a resume from a moved copy is the same run
        }

    def _restore(self, tag: Path) -> None:
        """Load a checkpoint and put back epoch, stream position, RNG and best metric."""
        state = ckpt.Checkpointer.load(self.engine, tag)
        if state.get("world_size") != self.env.world_size:  # checked before start-up; this tag changed since
            raise ckpt.CheckpointError(f"checkpoint {tag} was written by {state.get('world_size')} ranks; this job "
                                       f"has {self.env.world_size} (an exact resume needs the same world size)")
        saved = from_dict(state["mip_config"])
        diffs = config_diff(to_dict(saved), to_dict(self.cfg))
        if diffs and self.is_main:
            log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(diffs))
        if self.is_main and self.resume_changes:  # permitted by --allow-config-change: the run's config now
            log.info("continuing %s with %s (--allow-config-change)", self.run_dir,
                     "; ".join(f"{k}: {v}" for k, v in self.resume_changes.items()))
            save_config(self.cfg, self.run_dir / "config.yaml")
        self.epoch, self.micro_in_epoch = int(state["epoch"]), int(state["micro_in_epoch"])
        self.bad_total = int(state.get("bad_steps_total", 0))
        self.validator.load_state_dict(state)
        mine = state["ranks"][self.env.rank]
        ckpt.restore_rng(mine["rng"])
        self._stream_state = mine["stream"]
        self.checkpointer.last_saved_step = self.step
        if self.is_main and self.step < self.total_steps:  # more epochs: not finished until they are done
            (self.run_dir / FINISHED).unlink(missing_ok=True)
        if self.is_main:
            log.info("resumed from %s: step %d, epoch %d, batch %d of the epoch", tag, self.step, self.epoch,
                     self.micro_in_epoch)

    def save(self) -> Path:
        """Collective checkpoint of the current step (skipped if this step is already saved)."""
        if self.checkpointer.last_saved_step == self.step:
            return self.checkpointer.dir / ckpt.tag_for(self.step)
        t0 = time.perf_counter()
        tag = self.checkpointer.save(self.engine, self.step, self._client_state())
        if self.timer is not None:
            self.timer.exclude(time.perf_counter() - t0)
        return tag

    # ------------------------------------------------------------------------------------------ loop

    def fit(self) -> dict[str, Any]:
        """Train to cfg.train.epochs; returns {"status", "step", "run_dir", "best_metric", ...}."""
        if self.step >= self.total_steps and (self.run_dir / FINISHED).is_file():
            if self.is_main:
                log.info("%s already finished at step %d; nothing to do", self.run_dir, self.step)
            self.metrics.close()
            return {**json.loads((self.run_dir / FINISHED).read_text()), "status": "already_finished"}
        previous = ({sig: signal.signal(sig, self._on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
                    if main_thread() else {})
        self.timer = StepTimer()
        self.bar = tqdm(total=self.total_steps, initial=self.step, dynamic_ncols=True, desc="train",
                        disable=not (self.is_main and sys.stderr.isatty()))  # log lines only when not a terminal
        self.window: dict[str, list[float]] = {}
        status = "finished"
        try:
            with logging_redirect_tqdm():
                while self.epoch < self.cfg.train.epochs:
                    if not self._train_epoch():
                        status = "interrupted"
                        break
                    with peers_named(f"the end of epoch {self.epoch} (checkpoint, evaluation)"):
                        self._end_epoch()
        finally:
            self.bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if status == "finished":
            self._finish()
        summary = {"status": status, "step": self.step, "epoch": self.epoch, "run_dir": str(self.run_dir),
                   **self.validator.state_dict(), "bad_steps_total": self.bad_total}
        if self.is_main and status == "finished":
            (self.run_dir / FINISHED).write_text(json.dumps(summary, indent=2) + "\n")
        self.metrics.close()
        return summary

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; False if a stop (SIGTERM) was agreed by all ranks."""
        self.stream.set_epoch(self.epoch)
        if self._stream_state is not None and 0 < self.micro_in_epoch < self.micro_per_epoch:
            self.stream.load_state_dict(self._stream_state)  # resume inside the epoch
        self._stream_state = None
        batches = iter(self.stream)
        while self.micro_in_epoch < self.micro_per_epoch:
            t0 = time.perf_counter()
            try:
                with torch.random.fork_rng(devices=[]):  # loader start-up draws from the global RNG: keep
                    batch = next(batches)                # the training RNG independent of it (exact resume)
            except StopIteration:
                raise RuntimeError(f"the train stream ended after {self.micro_in_epoch} of "
                                   f"{self.micro_per_epoch} batches in epoch {self.epoch}") from None
            except RuntimeError:
                if self._stop:  # data workers died of the same SIGTERM
                    return self._stop_now()
                raise
            with peers_named(f"training step {self.step + 1} (epoch {self.epoch}): the loss and gradient "
                             "all-reduces between ranks"):
                stepped, stop = self._train_step(batch, data_wait=time.perf_counter() - t0)
            self.micro_in_epoch += 1
            if stepped:
                self._after_step()
            if stop and self._at_boundary():
                return self._stop_now()
        return True

    def _train_step(self, batch: dict[str, torch.Tensor], data_wait: float) -> tuple[bool, bool]:
        """Forward, agree on finiteness/stop across ranks, backward, optimizer step. Returns
        (an optimizer step happened, all ranks agreed to stop). Labels are checked on the host batch;
        after that the step reads one small tensor back from the device."""
        check_batch(batch, self.num_classes, self.num_cameras)
        images = TrainStream.device_images(batch, self.device, self.dtype)  # uint8 over the bus, normalised there
        pids, camera, modality = (batch[k].to(self.device, non_blocking=True) for k in ("pid", "camera", "modality"))
        running_stats = [(b, b.detach().clone()) for b in self.engine.module.buffers()]  # BatchNorm statistics

        out = self.engine.module.unpack(self.engine(images, modality, camera))
        loss, parts = self.loss_fn(to_float32(out), pids, modality, self.epoch)

        # one collective and one host read: summed loss parts, "some rank's loss is non-finite", "some rank got SIGTERM"
        names = ["loss", *sorted(k for k in parts if k != "total")]
        total = loss.detach().double()
        stats = torch.stack([total, *(parts[k].double() for k in names[1:]), (~torch.isfinite(total)).double(),
                             total.new_full((), float(self._stop))])
        values = to_host(all_reduce_sum(stats))
        bad, stop = values[-2] > 0, values[-1] > 0
        if bad:  # leave no trace: restore the BatchNorm statistics, no backward, no step
            for buf, saved in running_stats:
                buf.copy_(saved)
            self.timer.add(data_wait, images.shape[0], optimizer_steps=0)
            return self._skip_bad_step(), stop

        boundary = bool(self.engine.is_gradient_accumulation_boundary())
        if boundary:
            set_lr(self.optimizer, self.step, self.micro_per_epoch / self.accum, self.cfg.optim)
        self.engine.backward(loss)
        zero = self.ds_stage > 0
        max_norm = self.cfg.optim.grad_clip if self.clip_here else 0.0
        norm = grad_norm_stage0(self.engine, max_norm) if boundary and not zero else None
        self.engine.step()
        self.bad_in_row = 0
        self._accumulate({k: v / self.env.world_size for k, v in zip(names, values[:-2])})
        if boundary:  # kept as a device tensor until the logging step reads the window
            self._accumulate({"grad_norm": grad_norm_zero(self.engine) if zero else norm})
        self.timer.add(data_wait, images.shape[0], optimizer_steps=int(boundary))
        return boundary, stop

    # ------------------------------------------------------------------------------------------ helpers

    def _at_boundary(self) -> bool:
        """No gradients pending: the last micro-batch closed an accumulation cycle."""
        return int(self.engine.micro_steps) % self.accum == 0

    def _skip_bad_step(self) -> bool:
        """Drop a micro-batch whose loss is non-finite on some rank; stop after too many in a row."""
        self.bad_total += 1
        self.bad_in_row += 1
        if self.is_main:
            log.warning("non-finite loss at step %d (epoch %d): batch skipped (%d in a row, %d total)",
                        self.step, self.epoch, self.bad_in_row, self.bad_total)
        if self.bad_in_row > self.cfg.train.max_bad_steps:
            last_good = self.checkpointer.dir / ckpt.tag_for(self.checkpointer.last_saved_step)
            tag = self.save() if self._at_boundary() else last_good
            self.metrics.write({"kind": "abort", "step": self.step, "epoch": self.epoch,
                                "bad_steps_total": self.bad_total})
            self.metrics.close()
            raise TrainingDiverged(
                f"{self.bad_in_row} non-finite losses in a row (train.max_bad_steps={self.cfg.train.max_bad_steps}) "
                f"at step {self.step}, epoch {self.epoch}; weights were not updated by the skipped batches; "
                f"last good checkpoint: {tag}")
        return False

    def _accumulate(self, values: dict[str, Any]) -> None:
        """Collect values (floats, or device tensors read at the logging step) for the current window."""
        for k, v in values.items():
            self.window.setdefault(k, []).append(v)

    def _after_step(self) -> None:
        """Progress bar, periodic log line / metrics, step checkpoints."""
        step = self.step
        self.bar.update(1)
        if not self._throughput_announced and self.timer.steps_so_far() >= THROUGHPUT_PROBE_STEPS:
            self._announce_throughput()
        if step % self.cfg.train.log_every == 0 or step == self.total_steps:
            self._log_window()
        every = self.cfg.train.ckpt_every_steps
        if every > 0 and step % every == 0 and self.micro_in_epoch < self.micro_per_epoch:
            self.save()  # (an epoch's last step is saved by _end_epoch, positioned at the next epoch)

    def _announce_throughput(self) -> None:
        """Once, early: the measured img/s and the ETA of the whole run, so a user knows what to expect."""
        self._throughput_announced = True
        img_s, seconds_per_step = self.timer.rate_so_far(self.env.world_size)
        if self.is_main:
            log.info("measured %.1f img/s over the first %d steps: about %.1f min for the %d steps left "
                     "(evaluations not included)", img_s, self.timer.steps_so_far(),
                     seconds_per_step * (self.total_steps - self.step) / 60, self.total_steps - self.step)

    def _log_window(self) -> None:
        """Means of the window's values, LR, throughput, data wait and ETA to metrics.jsonl/TensorBoard."""
        record: dict[str, Any] = {"kind": "train", "step": self.step,
                                  "epoch": round(self.epoch + self.micro_in_epoch / self.micro_per_epoch, 4)}
        record.update({k: float(np.mean(read_floats(v))) for k, v in self.window.items()})
        record["lr"] = self.cfg.optim.lr * lr_mult(self.optimizer)
        record.update(self.timer.window(self.env.world_size, self.total_steps - self.step))
        record["bad_steps_total"] = self.bad_total
        self.window, _ = {}, self.timer.reset()
        self.metrics.write(record)
        if self.is_main:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")
            log.info(format_train_record(record, self.total_steps))

    def _end_epoch(self) -> None:
        """Move to the next epoch, checkpoint there, evaluate if due."""
        finished_epoch = self.epoch + 1
        self.epoch, self.micro_in_epoch = finished_epoch, 0
        if self._at_boundary():
            self.save()
        else:
            log.warning("epoch %d ended inside an accumulation cycle; no epoch checkpoint", finished_epoch - 1)
        if self.validator.should_evaluate(finished_epoch):
            self._evaluate(self._consolidated(), final=False)

    def _stop_now(self) -> bool:
        """Agreed stop (SIGTERM or Ctrl-C on some rank): checkpoint where we are and leave the loop."""
        tag = self.save()
        if self.is_main:
            log.warning("stopped by a signal: saved %s at step %d; resume with --resume auto", tag, self.step)
        return False

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM or a first Ctrl-C: stop at the next step boundary, agreed over all ranks, after a
        checkpoint. A second Ctrl-C aborts at once (KeyboardInterrupt, no checkpoint)."""
        if signum == signal.SIGINT:
            if self._stop:
                raise KeyboardInterrupt
            if self.is_main:
                log.warning("Ctrl-C: saving a checkpoint at the next step boundary (press Ctrl-C again to abort now)")
        self._stop = True

    # ------------------------------------------------------------------------------------------ end

    def _consolidated(self) -> Optional[dict]:
        """fp32 full model state on rank 0 (from the checkpoint of this step when ZeRO shards it)."""
        tag = self.save()
        return ckpt.consolidated_state_dict(self.engine, tag, self.ds_stage,
                                            self.dtype == torch.float32, strip_prefix="model.")

    def _evaluate(self, state: Optional[dict], final: bool) -> None:
        """Evaluate consolidated weights (on rank 0) and log the metrics; its time is not training time."""
        t0 = time.perf_counter()
        metrics = self.validator.run(state, epoch=self.epoch, step=self.step, final=final)
        self.metrics.write({"kind": "eval", "step": self.step, "epoch": self.epoch, **metrics}, prefix="eval")
        if self.timer is not None:
            self.timer.exclude(time.perf_counter() - t0)

    def _finish(self) -> None:
        """Refuse non-finite final weights; final evaluation (if evaluation is on); model_final.pt."""
        state = self._consolidated()
        broken = broadcast_object(non_finite_tensors(state) if self.is_main else None)
        if broken:
            raise TrainingDiverged(
                f"the final weights hold non-finite values in {len(broken)} tensors ({', '.join(broken[:3])}"
                f"{', ...' if len(broken) > 3 else ''}); no model_final.pt and no {FINISHED} marker were written; "
                f"check optim.lr and the loss curve in {self.run_dir / 'metrics.jsonl'}")
        if self.validator.enabled:
            self._evaluate(state, final=True)  # consolidated once (under ZeRO: read from the checkpoint)
        if self.is_main:
            self.validator.export(self.run_dir / "model_final.pt", state)
            try:
                plot_loss_curve(self.metrics.path, self.run_dir / "loss.png")
            except Exception as exc:  # a plot must never end a training run
                log.warning("could not plot the loss curve: %s", exc)
        barrier()


