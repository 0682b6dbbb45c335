"""One Trainer: builds model, data stream, loss and DeepSpeed engine, then trains with logging,
checkpoints, resume, periodic evaluation and fault handling."""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mip_dist.config import Config, from_dict, save_config, to_dict
from mip_dist.data.batch import check_batch

from . import checkpoint as ckpt
from .distributed import DistEnv, all_gather_object, all_reduce_sum, barrier, broadcast_object, to_host
from .ds_config import load_ds_config
from .metrics_log import MetricsLogger, StepTimer
from .optim import build_optimizer, build_param_groups, freeze_backbone, set_lr
from .run_checks import check_shards_for_run
from .zero import prepare_for_zero3

log = logging.getLogger(__name__)

FINISHED = "FINISHED"  # marker (with the summary) written by rank 0 when a run completes


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row; a checkpoint of the last good state was saved."""


class RunDirError(RuntimeError):
    """The run directory exists and resuming was not asked for."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_float32(obj: Any) -> Any:
    """Cast every floating tensor of a (dataclass / list / dict of) model output to fp32 for the loss."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: to_float32(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_float32(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_float32(v) for k, v in obj.items()}
    return obj


def resolve_run_dir(cfg: Config, resume: Optional[str]) -> tuple[Path, Optional[Path]]:
    """(run directory, checkpoint tag to resume from). Refuses to reuse a non-empty run directory
    unless resuming, so a finished run is never overwritten silently."""
    output_dir = Path(cfg.train.output_dir)
    named = output_dir / cfg.train.run_name if cfg.train.run_name else None
    tag = ckpt.resolve_resume(resume, named, output_dir) if resume else None
    if tag is not None:
        return tag.parent.parent, tag
    if named is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        named = output_dir / stamp
        n = 1
        while named.exists():
            named, n = output_dir / f"{stamp}-{n}", n + 1
    elif named.exists() and any(named.iterdir()) and resume != "auto":
        state = "a finished run" if (named / FINISHED).exists() else "an earlier run"
        raise RunDirError(f"train.run_name: {named} already holds {state}; pass --resume auto to continue it "
                          "or choose another train.run_name")
    return named, None


class DictOutput(nn.Module):
    """Wraps the model for DeepSpeed: returns its output dataclass as a dict (ZeRO-3 hooks only see
    tensors inside tuples/lists/dicts). Under ZeRO-3 every parameter is read only inside its own
    module's call (see engine/zero.py), so ZeRO gathers one module's parameters at a time and none is
    registered as external. Checkpoint keys carry the `model.` prefix; exports strip it."""

    def __init__(self, model: nn.Module, zero3: bool) -> None:
        super().__init__()
        self.model = model
        self._out_type: Optional[type] = None
        if zero3:
            prepare_for_zero3(self, model)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        out = self.model(*args, **kwargs)
        self._out_type = type(out)
        return {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}

    def unpack(self, out: dict[str, Any]) -> Any:
        """The model's own output object again."""
        return self._out_type(**out)


class Trainer:
    """Trains MIP with a DeepSpeed engine; `fit()` runs to the end (or to SIGTERM) and returns a summary."""

    def __init__(self, cfg: Config, env: DistEnv, resume: Optional[str] = None) -> None:
        from mip_dist.losses import MIPLoss

        self.cfg, self.env = cfg, env
        self.is_main = env.is_main
        self.run_dir, resume_tag = self._agree_run_dir(resume)
        seed_everything(cfg.train.seed)  # identical model init on every rank
        self._build_engine()
        self.loss_fn = MIPLoss(cfg.loss)
        self._build_stream()
        self.checkpointer = ckpt.Checkpointer(self.run_dir, cfg.train.keep_last, self.is_main)

        # training position; replaced by the checkpoint's when resuming
        self.epoch, self.micro_in_epoch, self.bad_total, self.bad_in_row = 0, 0, 0, 0
        self.best: Optional[float] = None
        self._stop = False
        self._stream_state: Optional[dict] = None
        self.timer: Optional[StepTimer] = None
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

    def _agree_run_dir(self, resume: Optional[str]) -> tuple[Path, Optional[Path]]:
        """Rank 0 picks the run directory (timestamps, existence checks); every rank follows or fails alike."""
        decision: Any = None
        if self.is_main:
            try:
                decision = resolve_run_dir(self.cfg, resume)
            except (RunDirError, FileNotFoundError, ValueError) as exc:
                decision = exc
        decision = broadcast_object(decision)
        if isinstance(decision, Exception):
            raise decision
        return decision

    def _build_engine(self) -> None:
        """Model (optionally with a frozen backbone), parameter groups, client optimizer, DeepSpeed engine."""
        import deepspeed

        from mip_dist.data.shards import read_index
        from mip_dist.model import build_model, param_category

        cfg = self.cfg
        self.index = read_index(cfg.data.shards)
        check_shards_for_run(cfg, self.index, cfg.data.shards)
        self.num_classes, self.num_cameras = int(self.index["num_classes"]), int(self.index["num_cameras"])
        self._build_model = build_model
        model = build_model(cfg.model, cfg.attention, num_classes=self.num_classes, num_cameras=self.num_cameras)
        if cfg.model.pretrained:  # before freezing and before the engine copies the weights
            model.load_pretrained(cfg.model.pretrained)
        if cfg.optim.freeze_backbone:
            log.info("prompt tuning: froze %d backbone parameters", freeze_backbone(model, param_category))
        groups = build_param_groups(model.named_parameters(), cfg.optim, param_category)
        self.ds_config = load_ds_config(cfg, self.env.world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=DictOutput(model, zero3=cfg.train.zero_stage == 3),
            optimizer=build_optimizer(groups, cfg.optim), config=self.ds_config)
        if cfg.train.compile:
            self.engine.compile()  # torch.compile through DeepSpeed (inductor on the engine's device)
        self.dtype = (torch.bfloat16 if self.engine.bfloat16_enabled()
                      else torch.float16 if self.engine.fp16_enabled() else torch.float32)
        self.device = self.engine.device

    def _build_stream(self) -> None:
        """This rank's training stream; an epoch uses a multiple of grad_accum of its batches."""
        from mip_dist.data.stream import build_train_stream

        env = self.env
        self.stream = build_train_stream(self.cfg.data, seed=self.cfg.train.seed, rank=env.rank,
                                         world_size=env.world_size)
        self.accum = self.cfg.train.grad_accum
        stream_steps = int(self.stream.steps_per_epoch)
        if stream_steps < self.accum:
            raise ValueError(f"train.grad_accum={self.accum} exceeds the {stream_steps} batches per epoch")
        self.micro_per_epoch = stream_steps // self.accum * self.accum  # accumulation cycles end with the epoch
        if self.micro_per_epoch != stream_steps and self.is_main:
            log.info("using %d of %d batches per epoch (a multiple of train.grad_accum=%d)",
                     self.micro_per_epoch, stream_steps, self.accum)
        self.total_steps = self.cfg.train.epochs * self.micro_per_epoch // self.accum

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
            "best_metric": self.best,
            "bad_steps_total": self.bad_total,
            "world_size": self.env.world_size,
            "ranks": all_gather_object(mine),
            "mip_config": to_dict(self.cfg),
        }

    def _restore(self, tag: Path) -> None:
        """Load a checkpoint and put back epoch, stream position, RNG and best metric."""
        state = ckpt.Checkpointer.load(self.engine, tag)
        if state.get("world_size") != self.env.world_size:
            raise RuntimeError(f"checkpoint {tag} was written by {state.get('world_size')} ranks; this job has "
                               f"{self.env.world_size} (exact resume needs the same world size)")
        saved = from_dict(state["mip_config"])
        diffs = _config_diff(to_dict(saved), to_dict(self.cfg))
        if diffs and self.is_main:
            log.warning("resuming with a config that differs from the checkpoint's: %s", "; ".join(diffs))
        self.epoch, self.micro_in_epoch = int(state["epoch"]), int(state["micro_in_epoch"])
        self.best, self.bad_total = state.get("best_metric"), int(state.get("bad_steps_total", 0))
        mine = state["ranks"][self.env.rank]
        ckpt.restore_rng(mine["rng"])
        self._stream_state = mine["stream"]
        self.checkpointer.last_saved_step = self.step
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
                    if _main_thread() else {})
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
                    self._end_epoch()
        finally:
            self.bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if status == "finished":
            self._finish()
        summary = {"status": status, "step": self.step, "epoch": self.epoch, "run_dir": str(self.run_dir),
                   "best_metric": self.best, "bad_steps_total": self.bad_total}
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
        images = batch["images"].to(self.device, dtype=self.dtype, non_blocking=True)
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
        grad_norm = self._grad_norm_stage0() if boundary and self.cfg.train.zero_stage == 0 else None
        self.engine.step()
        self.bad_in_row = 0
        self._accumulate({k: v / self.env.world_size for k, v in zip(names, values[:-2])})
        if boundary:  # kept as a device tensor until the logging step reads the window
            self._accumulate({"grad_norm": grad_norm if grad_norm is not None else self._grad_norm_zero()})
        self.timer.add(data_wait, images.shape[0], optimizer_steps=int(boundary))
        return boundary, stop

    # ------------------------------------------------------------------------------------------ helpers

    def _at_boundary(self) -> bool:
        """No gradients pending: the last micro-batch closed an accumulation cycle."""
        return int(self.engine.micro_steps) % self.accum == 0

    def _grad_norm_zero(self) -> Any:
        """Global gradient norm that the ZeRO optimizer computed during its step (a float or a tensor)."""
        gn = self.engine.get_global_grad_norm()
        return gn if gn is not None else float("nan")

    def _grad_norm_stage0(self) -> Any:
        """Global L2 norm of the (already all-reduced) gradients, left on the device; DeepSpeed reports
        none without ZeRO."""
        norms = [p.grad.detach().float().norm() for p in self.engine.module.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else 0.0

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
        if step % self.cfg.train.log_every == 0 or step == self.total_steps:
            self._log_window()
        every = self.cfg.train.ckpt_every_steps
        if every > 0 and step % every == 0 and self.micro_in_epoch < self.micro_per_epoch:
            self.save()  # (an epoch's last step is saved by _end_epoch, positioned at the next epoch)

    def _log_window(self) -> None:
        """Means of the window's values, LR, throughput, data wait and ETA to metrics.jsonl/TensorBoard."""
        record: dict[str, Any] = {"kind": "train", "step": self.step,
                                  "epoch": round(self.epoch + self.micro_in_epoch / self.micro_per_epoch, 4)}
        record.update({k: float(np.mean(_floats(v))) for k, v in self.window.items()})
        record["lr"] = self.cfg.optim.lr * _lr_mult(self.optimizer)
        record.update(self.timer.window(self.env.world_size, self.total_steps - self.step))
        record["bad_steps_total"] = self.bad_total
        self.window, _ = {}, self.timer.reset()
        self.metrics.write(record)
        if self.is_main:
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", lr=f"{record['lr']:.2e}")
            parts = " ".join(f"{k}={v:.4f}" for k, v in record.items()
                             if k not in ("kind", "step", "epoch", "lr", "img_s", "img_s_rank", "data_wait",
                                          "step_time", "eta_min", "bad_steps_total"))
            log.info("step %d/%d ep %.2f %s lr=%.3e img/s=%.1f (%.1f/rank) data_wait=%.0f%% eta=%.1fmin",
                     self.step, self.total_steps, record["epoch"], parts, record["lr"], record["img_s"],
                     record["img_s_rank"], 100 * record["data_wait"], record["eta_min"])

    def _end_epoch(self) -> None:
        """Move to the next epoch, checkpoint there, evaluate if due."""
        finished_epoch = self.epoch + 1
        self.epoch, self.micro_in_epoch = finished_epoch, 0
        if self._at_boundary():
            self.save()
        else:
            log.warning("epoch %d ended inside an accumulation cycle; no epoch checkpoint", finished_epoch - 1)
        every = self.cfg.train.eval_every_epochs
        if every > 0 and finished_epoch % every == 0 and finished_epoch < self.cfg.train.epochs:
            self._evaluate()

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
        return ckpt.consolidated_state_dict(self.engine, tag, self.cfg.train.zero_stage,
                                            self.dtype == torch.float32, strip_prefix="model.")

    def _evaluate(self, final: bool = False, state: Optional[dict] = None) -> dict[str, float]:
        """Evaluate a consolidated fp32 copy (`state`, else consolidated now) on rank 0; track the best
        checkpoint by train.best_metric."""
        try:
            from mip_dist.engine.evaluator import evaluate
        except ImportError as exc:
            if self.is_main:
                log.warning("evaluation skipped: evaluator unavailable (%s)", exc)
            return {}
        t0 = time.perf_counter()
        if state is None:
            state = self._consolidated()
        metrics: dict[str, float] = {}
        if self.is_main:
            model = self._build_model(self.cfg.model, self.cfg.attention, num_classes=self.num_classes,
                                      num_cameras=self.num_cameras)
            model.load_state_dict(state)
            model.to(self.device).eval()
            results = evaluate(model, self.cfg.data, self.cfg.eval, self.index, device=self.device)
            del model
            metrics = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
            self._report(results, final)
        metrics = broadcast_object(metrics)
        self.metrics.write({"kind": "eval", "step": self.step, "epoch": self.epoch, **metrics}, prefix="eval")
        value = metrics.get(self.cfg.train.best_metric)
        if value is None:
            if self.is_main:
                log.warning("train.best_metric %r not among evaluation results %s", self.cfg.train.best_metric,
                            sorted(metrics))
        elif self.best is None or value > self.best:
            self.best = value
            if self.is_main:
                ckpt.export_model(self.run_dir / "model_best.pt", state, self.cfg, self.num_classes, self.num_cameras)
                log.info("new best %s = %.4f at epoch %d", self.cfg.train.best_metric, value, self.epoch)
        if self.timer is not None:
            self.timer.exclude(time.perf_counter() - t0)
        return metrics

    def _report(self, results: dict, final: bool) -> None:
        """Rank 0: the protocol table in the log, results.json + CMC plot in run_dir (final) or run_dir/eval/epochNNN."""
        try:
            from mip_dist.eval.report import format_table, write_results

            log.info("evaluation after epoch %d:\n%s", self.epoch, format_table(results))
            write_results(results, self.run_dir if final else self.run_dir / "eval" / f"epoch{self.epoch:03d}",
                          meta={"epoch": self.epoch, "step": self.step, "run_dir": str(self.run_dir)})
        except Exception as exc:  # reporting must never end a training run
            log.warning("could not write the evaluation report: %s", exc)

    def _finish(self) -> None:
        """Refuse non-finite final weights; final evaluation (if evaluation is on); model_final.pt."""
        state = self._consolidated()
        broken = broadcast_object(_non_finite_tensors(state) if self.is_main else None)
        if broken:
            raise TrainingDiverged(
                f"the final weights hold non-finite values in {len(broken)} tensors ({', '.join(broken[:3])}"
                f"{', ...' if len(broken) > 3 else ''}); no model_final.pt and no {FINISHED} marker were written; "
                f"check optim.lr and the loss curve in {self.run_dir / 'metrics.jsonl'}")
        if self.cfg.train.eval_every_epochs > 0:
            self._evaluate(final=True, state=state)  # consolidated once (under ZeRO: read from the checkpoint)
        if self.is_main:
            ckpt.export_model(self.run_dir / "model_final.pt", state, self.cfg, self.num_classes, self.num_cameras)
            try:
                from mip_dist.eval.report import plot_loss_curve

                plot_loss_curve(self.metrics.path, self.run_dir / "loss.png")
            except Exception as exc:  # a plot must never end a training run
                log.warning("could not plot the loss curve: %s", exc)
        barrier()


def _non_finite_tensors(state: dict) -> list[str]:
    """Names of floating tensors in a state dict that hold NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _floats(values: list[Any]) -> list[float]:
    """A logging window's values as floats: device tensors are read back here, in one copy."""
    tensors = [torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(to_host(torch.stack([t.to(tensors[0].device) for t in tensors])))
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


def _lr_mult(optimizer: torch.optim.Optimizer) -> float:
    """Current schedule multiplier, read back from the first group."""
    g = optimizer.param_groups[0]
    return g["lr"] / g["initial_lr"]


def _main_thread() -> bool:
    """signal.signal only works in the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
