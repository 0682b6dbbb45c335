"""Evaluation during training as one component: when to evaluate, every dataset's protocols on its own
test shards, the report, the best-metric tracking and the `model_best.pt` export.

In a multi-dataset run (`data.shards` a list) every dataset is evaluated with its own protocol and
result keys carry its name (`sysu/all_single/mAP`); `train.best_metric` without a dataset name means
the first dataset's.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from mip_dist.config import Config, DataConfig
from mip_dist.data.sources import ResolvedSource
from mip_dist.eval.protocols import DEFAULT_PROTOCOL
from mip_dist.eval.report import format_table, write_results

from .export import export_model
from .distributed import broadcast_object
from .evaluator import evaluate

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalTarget:
    """One dataset's test set: its shards, index, protocols and where its cameras start in the model's SIE table."""

    name: str  # "" in a single-dataset run: result keys then carry no prefix
    data_cfg: DataConfig  # data.shards = this dataset's folder
    index: dict
    protocols: tuple[str, ...]
    camera_offset: int = 0

    def key(self, result_key: str) -> str:
        """A result key of this dataset as it appears in the merged results."""
        return f"{self.name}/{result_key}" if self.name else result_key


def eval_targets(cfg: Config, sources: list[ResolvedSource]) -> list[EvalTarget]:
    """Each training dataset's test set with its protocols; unprefixed keys for a single dataset."""
    if not cfg.data.multi_dataset:
        return [EvalTarget("", cfg.data, sources[0].index, tuple(cfg.eval.protocols))]
    configured = {s.name: s for s in cfg.data.sources()}
    return [EvalTarget(src.name, dataclasses.replace(cfg.data, shards=src.path), src.index,
                       (configured[src.name].protocol or DEFAULT_PROTOCOL[src.dataset],), src.camera_offset)
            for src in sources]


class Validator:
    """Owns the evaluation cadence, the best metric so far and model_best.pt (rank 0 evaluates)."""

    def __init__(self, cfg: Config, targets: list[EvalTarget], run_dir: Path, build_model: Callable[[], nn.Module],
                 *, is_main: bool, device: torch.device, num_classes: int, num_cameras: int) -> None:
        self.cfg, self.targets, self.run_dir = cfg, targets, run_dir
        self.build_model, self.is_main, self.device = build_model, is_main, device
        self.num_classes, self.num_cameras = num_classes, num_cameras
        self.best: Optional[float] = None
        self.best_key = cfg.train.best_metric
        names = {t.name for t in targets if t.name}
        if names and self.best_key.split("/", 1)[0] not in names:
            self.best_key = targets[0].key(self.best_key)  # "all_single/mAP" -> the first dataset's

    @property
    def enabled(self) -> bool:
        """Evaluation is on (train.eval_every_epochs > 0)."""
        return self.cfg.train.eval_every_epochs > 0

    def should_evaluate(self, epoch: int) -> bool:
        """Due after `epoch` finished epochs (the last epoch is evaluated by the final evaluation)."""
        every = self.cfg.train.eval_every_epochs
        return every > 0 and epoch % every == 0 and epoch < self.cfg.train.epochs

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to keep tracking the best metric."""
        return {"best_metric": self.best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back the best metric of a checkpoint."""
        self.best = state.get("best_metric")

    def run(self, state: Optional[dict], *, epoch: int, step: int, final: bool) -> dict[str, float]:
        """Every rank calls: rank 0 evaluates `state` (consolidated fp32 weights), reports, tracks the best and
        exports model_best.pt; all ranks get the flat metrics (for metrics.jsonl)."""
        metrics: dict[str, float] = {}
        if self.is_main:
            results = self._evaluate(state)
            metrics = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
            self._report(results, epoch, step, final)
        metrics = broadcast_object(metrics)
        self._track_best(metrics, state, epoch)
        return metrics

    def _evaluate(self, state: dict) -> dict[str, Any]:
        """Each dataset's protocols on its own test shards, merged under its name."""
        t0 = time.perf_counter()
        model = self.build_model()
        model.load_state_dict(state)
        model.to(self.device).eval()
        merged: dict[str, Any] = {}
        for target in self.targets:
            results = evaluate(model, target.data_cfg, self.cfg.eval, target.index, device=self.device,
                               protocols=list(target.protocols), camera_offset=target.camera_offset)
            merged.update({target.key(k): v for k, v in results.items()})
        log.info("evaluation of %d dataset(s) took %.1fs", len(self.targets), time.perf_counter() - t0)
        return merged

    def _report(self, results: dict, epoch: int, step: int, final: bool) -> None:
        """results.json + CMC plot in run_dir (final) or run_dir/eval/epochNNN; the protocol table in the log
        for the evaluations during training only: the final one is the run's results.json, whose table the
        entry point prints once with the run's summary."""
        try:
            paths = write_results(results, self.run_dir if final else self.run_dir / "eval" / f"epoch{epoch:03d}",
                                  meta={"epoch": epoch, "step": step, "run_dir": str(self.run_dir)})
            if final:
                log.info("final evaluation after epoch %d: %s", epoch, paths[0])
            else:
                log.info("evaluation after epoch %d:\n%s", epoch, format_table(results))
        except Exception as exc:  # reporting must never end a training run
            log.warning("could not write the evaluation report: %s", exc)

    def _track_best(self, metrics: dict[str, float], state: Optional[dict], epoch: int) -> None:
        """Remember a new best train.best_metric and export its weights as model_best.pt."""
        value = metrics.get(self.best_key)
        if value is None:
            if self.is_main:
                log.warning("train.best_metric %r not among evaluation results %s", self.best_key, sorted(metrics))
        elif self.best is None or value > self.best:
            self.best = value
            if self.is_main:
                self.export(self.run_dir / "model_best.pt", state)
                log.info("new best %s = %.4f at epoch %d", self.best_key, value, epoch)

    def export(self, path: Path, state: dict) -> Path:
        """The evaluation/inference file of `state`; a multi-dataset model also records where each dataset's
        test shards, protocol and cameras are, so `launch/evaluate.py --dataset NAME` can pick one."""
        datasets = [{"name": t.name, "path": str(t.data_cfg.shards), "protocol": t.protocols[0],
                     "dataset": t.index.get("dataset"), "camera_offset": t.camera_offset,
                     "num_cameras": int(t.index["num_cameras"])} for t in self.targets if t.name]
        return export_model(path, state, self.cfg, self.num_classes, self.num_cameras, datasets or None)
