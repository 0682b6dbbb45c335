"""Test-time feature extraction (once per image, across ranks) and every protocol setting from it.

`extract_features` runs `model.extract(images, modality, camera)` over a test loader (any iterable of
{"images", "key", "pid", "camera", "modality"} batches; camera is the dataset's 1-based number and is
passed to the model 0-based), optionally averaging with the horizontally flipped image. When a
process group is up, each rank extracts the share its loader yields and the shares are gathered,
ordered by key and de-duplicated, so every rank ends with the same features and no image counts
twice (the trainer, which evaluates on rank 0 only, asks for no gathering). `evaluate_features` then
runs every Setting of the requested protocols from those features: one float64 distance matrix per
setting between all its candidate queries and gallery images, each trial's queries (drawn per trial
for LLCM VIS->IR) and gallery cut from it; `evaluate` chains the two for the trainer and
`launch/evaluate.py`.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mip_dist.data.eval_loader import build_test_loader
from mip_dist.engine import distributed
from mip_dist.eval.metrics import pairwise_distance, rank_metrics
from mip_dist.eval.protocols import Setting, build_settings
from mip_dist.eval.rerank import re_ranking

log = logging.getLogger(__name__)

REPORTED_RANKS = (1, 5, 10, 20)
SUMMARY_KEYS = ("R1", "R10", "R20", "mAP", "mINP")
PROGRESS_EVERY_S = 10.0  # a log line this often while extracting, where no progress bar can be drawn


class ExtractionProgress:
    """Says how far feature extraction is, so a long evaluation is never silent: a tqdm bar on a terminal,
    else a log line (images done, images/s, time left) every `every_s` seconds."""

    def __init__(self, total: Optional[int], every_s: float = PROGRESS_EVERY_S, bar: Optional[bool] = None) -> None:
        self.total, self.every_s, self.done = total, every_s, 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        log.info("extracting features of %s test images", total if total is not None else "the")
        if (sys.stderr.isatty() if bar is None else bar) and log.isEnabledFor(logging.INFO):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc="extracting features", leave=False, dynamic_ncols=True)

    def update(self, images: int) -> None:
        """Count a finished batch; draw the bar or, when due (and at the end), log a line."""
        self.done += images
        if self.bar is not None:
            self.bar.update(images)
            return
        now = time.perf_counter()
        if now - self.last >= self.every_s or (self.total is not None and self.done >= self.total):
            self.last = now
            log.info("extracting features: %s", self.describe(now))

    def describe(self, now: float) -> str:
        """'256/622 images (41%), 12.3 images/s, about 30 s left'."""
        rate = self.done / max(now - self.start, 1e-9)
        if not self.total:
            return f"{self.done} images, {rate:.1f} images/s"
        left = max(self.total - self.done, 0) / max(rate, 1e-9)
        return (f"{self.done}/{self.total} images ({100 * self.done / self.total:.0f}%), {rate:.1f} images/s, "
                f"about {left:.0f} s left")

    def close(self) -> None:
        """Remove the bar (the final 'extracted ...' line follows)."""
        if self.bar is not None:
            self.bar.close()


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass when a reduced dtype is asked for."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _group_size() -> int:
    """World size of the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_shares(feats: torch.Tensor, keys: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Every rank's (features, keys), concatenated in rank order (identity without a process group)."""
    if _group_size() == 1:
        return feats, keys
    world = dist.get_world_size()
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, (keys, int(feats.shape[1]) if feats.numel() else -1))
    sizes = [len(k) for k, _ in shares]
    dim = max(d for _, d in shares)
    if dim < 0:
        return feats, []
    comm_device = distributed.comm_device()
    padded = torch.zeros(max(sizes), dim, dtype=torch.float32, device=comm_device)
    if feats.numel():
        padded[: feats.shape[0]] = feats.to(comm_device)
    bucket = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(bucket, padded)
    out = torch.cat([b[:n].cpu() for b, n in zip(bucket, sizes)])
    return out, [k for ks, _ in shares for k in ks]


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: Iterable[dict], *, device: torch.device | str,
                     flip: bool = False, dtype: torch.dtype = torch.float32,
                     distributed: Optional[bool] = None, camera_offset: int = 0, total: Optional[int] = None,
                     progress_every_s: float = PROGRESS_EVERY_S) -> tuple[torch.Tensor, list[str]]:
    """(features [N, F] float32 on CPU, keys [N]) for every test image, ordered by key, each once.

    total: images this process will extract (for the progress bar / lines; None = unknown).

    camera_offset: where this dataset's cameras start in the model's camera (SIE) table, for a model
    trained on several datasets.

    distributed: gather every rank's share (all ranks must call, each with its own share of the
    test set); None = whenever a process group with more than one rank is up.
    """
    device = torch.device(device)
    if distributed is None:
        distributed = _group_size() > 1
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    keys: list[str] = []
    start = time.perf_counter()
    progress = ExtractionProgress(total, progress_every_s)
    try:
        with torch.inference_mode(), _autocast(device, dtype):
            for batch in loader:
                images = batch["images"].to(device, non_blocking=True)
                modality = torch.as_tensor(batch["modality"]).to(device=device, dtype=torch.long)
                camera = torch.as_tensor(batch["camera"]).to(device=device, dtype=torch.long) - 1
                if bool((camera < 0).any()):
                    raise ValueError("batch 'camera' must be the dataset's 1-based camera number; got 0 or less")
                camera = camera + camera_offset
                feat = model.extract(images, modality, camera).float()
                if flip:
                    feat_flip = model.extract(images.flip(-1), modality, camera).float()
                    feat = F.normalize(0.5 * (feat + feat_flip), dim=1)
                chunks.append(feat.cpu())
                keys.extend(str(k) for k in batch["key"])
                progress.update(len(batch["key"]))
    finally:
        progress.close()
        model.train(was_training)
    feats = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    if feats.shape[0] != len(keys):
        raise ValueError(f"loader yielded {len(keys)} keys for {feats.shape[0]} images")
    if distributed:
        feats, keys = _gather_shares(feats, keys)
    order = sorted(range(len(keys)), key=keys.__getitem__)
    unique, seen = [], set()
    for i in order:
        if keys[i] not in seen:
            seen.add(keys[i])
            unique.append(i)
    if len(unique) < len(keys):
        log.info("extract_features: %d duplicate images (padding of rank shares) dropped", len(keys) - len(unique))
    idx = torch.as_tensor(unique, dtype=torch.long)
    feats = feats[idx] if feats.numel() else feats
    seconds = time.perf_counter() - start
    log.info("extracted %d features of dim %d in %.1fs, %.1f images/s (flip=%s, dtype=%s)", len(unique),
             feats.shape[1] if feats.dim() == 2 else 0, seconds, len(unique) / max(seconds, 1e-9), flip, dtype)
    return feats.contiguous(), [keys[i] for i in unique]


def _record_rows(index: dict, keys: Sequence[str]) -> np.ndarray:
    """Feature row of every index test record; raises naming a record whose image was not extracted."""
    row_of = {k: i for i, k in enumerate(keys)}
    records = index["test_records"]
    missing = [r["key"] for r in records if r["key"] not in row_of]
    if missing:
        raise ValueError(f"{len(missing)} of {len(records)} test records have no feature (e.g. key "
                         f"{missing[0]!r}): the test loader did not yield them")
    return np.asarray([row_of[r["key"]] for r in records], dtype=np.int64)


def _summarise(per_trial: list[dict], max_rank: int) -> dict:
    """Mean and (population) std over trials, in percent, plus the mean CMC curve."""
    cmc = np.stack([m["cmc"] for m in per_trial]) * 100.0
    out: dict[str, Any] = {}
    for r in REPORTED_RANKS:
        if r <= max_rank:
            out[f"R{r}"] = float(cmc[:, r - 1].mean())
            out[f"R{r}_std"] = float(cmc[:, r - 1].std())
    for k in ("mAP", "mINP"):
        vals = np.asarray([m[k] for m in per_trial]) * 100.0
        out[k], out[f"{k}_std"] = float(vals.mean()), float(vals.std())
    out["cmc"] = cmc.mean(0).tolist()
    return out


def _cached_distances(cache: dict, feats: torch.Tensor, rows: torch.Tensor, s: Setting, query: np.ndarray,
                      gallery: np.ndarray, device: torch.device) -> torch.Tensor:
    """One trial's [query, gallery] distances, cut from the setting's all-candidates matrix (computed once)."""
    q_union = np.unique(np.concatenate(s.query_draws) if s.query_draws is not None else s.query)
    g_union = np.unique(np.concatenate(s.galleries))
    key = q_union.tobytes() + b"|" + g_union.tobytes()
    if key not in cache:
        cache[key] = (pairwise_distance(feats[rows[q_union]].to(device), feats[rows[g_union]].to(device)),
                      q_union, g_union)
    full, q_all, g_all = cache[key]
    g_cols = torch.as_tensor(np.searchsorted(g_all, gallery), device=device)
    q_rows = torch.as_tensor(np.searchsorted(q_all, query), device=device)
    return full.index_select(1, g_cols).index_select(0, q_rows)


def evaluate_features(feats: torch.Tensor, keys: Sequence[str], index: dict, protocols: Sequence[str], *,
                      trials: int = 10, max_rank: int = 20, rerank: bool = False,
                      device: torch.device | str = "cpu") -> dict:
    """{setting: metrics} (percent) for every Setting of `protocols`, plus flat "setting/metric" keys."""
    device = torch.device(device)
    max_rank = max(max_rank, max(REPORTED_RANKS))
    rows = torch.as_tensor(_record_rows(index, keys))
    records = index["test_records"]
    pids = torch.as_tensor([int(r["pid"]) for r in records], dtype=torch.int64)
    cams = torch.as_tensor([int(r["camera"]) for r in records], dtype=torch.int64)
    feats = F.normalize(feats.double(), dim=1)  # float64 from here: no float32 rounding before the distances
    settings = build_settings(index, protocols, trials)

    results: dict[str, Any] = {}
    dist_cache: dict[bytes, tuple[torch.Tensor, np.ndarray, np.ndarray]] = {}
    for number, s in enumerate(settings, 1):
        t0 = time.perf_counter()
        log.info("setting %d/%d %s (%s): %d trial(s)%s", number, len(settings), s.name, s.protocol, s.trials,
                 ", re-ranking each" if rerank else "")
        per_trial = []
        for trial, gallery in enumerate(s.galleries):
            query = s.trial_query(trial)
            if rerank:
                distmat = re_ranking(feats[rows[query]].to(device), feats[rows[gallery]].to(device))
            else:
                distmat = _cached_distances(dist_cache, feats, rows, s, query, gallery, device)
            per_trial.append(rank_metrics(distmat, pids[query], pids[gallery], cams[query], cams[gallery],
                                          protocol=s.metric, max_rank=max_rank))
        summary = _summarise(per_trial, max_rank)
        summary.update({
            "trials": s.trials, "seeds": list(s.seeds), "protocol": s.protocol, "metric": s.metric,
            "description": s.description, "num_query": int(s.trial_query(0).size), "headline": s.headline,
            "num_gallery": int(s.galleries[0].size), "rerank": rerank, **({"split": s.counts["split"]}
                                                                           if s.counts.get("split") else {}),
            "per_trial": [{"seed": seed, "R1": float(m["cmc"][0] * 100), "mAP": float(m["mAP"] * 100),
                           "mINP": float(m["mINP"] * 100)} for seed, m in zip(s.seeds, per_trial)],
        })
        results[s.name] = summary
        log.info("%s: R1 %.2f  R10 %.2f  R20 %.2f  mAP %.2f  mINP %.2f  (%d trial(s), %.2fs)", s.name,
                 summary["R1"], summary["R10"], summary["R20"], summary["mAP"], summary["mINP"], s.trials,
                 time.perf_counter() - t0)
    for name in [s.name for s in settings]:
        for k in SUMMARY_KEYS:
            results[f"{name}/{k}"] = results[name][k]
    return results


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 autocast on GPUs that support it, fp32 elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def evaluate(model: torch.nn.Module, data_cfg: Any, eval_cfg: Any, index: dict, *,
             device: torch.device | str, loader: Optional[Iterable[dict]] = None,
             protocols: Optional[Sequence[str]] = None, dtype: Optional[torch.dtype] = None,
             distributed: bool = False, camera_offset: int = 0) -> dict:
    """Extract test features once and run every protocol setting; see `evaluate_features` for the result.

    distributed=False (what a rank-0-only caller needs): this process extracts the whole test set.
    distributed=True: EVERY rank must call; each extracts its share and all get the same results.
    `loader` defaults to `mip_dist.data.stream.build_test_loader(data_cfg, rank=, world_size=,
    batch_size=eval_cfg.batch_size)`; `protocols` defaults to `eval_cfg.protocols`.
    """
    device = torch.device(device)
    if distributed and _group_size() == 1:
        distributed = False
    if loader is None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        loader = build_test_loader(data_cfg, rank=rank, world_size=world, batch_size=eval_cfg.batch_size)
    records = len(index.get("test_records") or [])
    feats, keys = extract_features(model, loader, device=device, flip=eval_cfg.flip,
                                   dtype=dtype if dtype is not None else default_dtype(device),
                                   distributed=distributed, camera_offset=camera_offset,
                                   total=-(-records // _group_size()) if distributed else records)
    return evaluate_features(feats, keys, index, list(protocols or eval_cfg.protocols), trials=eval_cfg.trials,
                             max_rank=eval_cfg.max_rank, rerank=eval_cfg.rerank, device=device)
