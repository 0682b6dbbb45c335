"""Gallery search: exact top-k by cosine similarity between feature files, FAISS or plain torch.

Features are L2-normalised rows (see `feature_file`), so the inner product is the cosine similarity;
both backends are exact (brute force) and interchangeable:

- `faiss`: `IndexFlatIP` (BLAS matrix products, multi-threaded); holds its own float32 copy of the rows.
  While it searches, FAISS's process-wide BLAS settings are set to `_FAISS_BLAS` and restored afterwards:
  faiss-cpu 1.15's defaults (matrix products only from 128,000 queries on, in 4096 x 1024 blocks) made a
  batch of 100 queries 10-15x slower than one matrix product on a 2-core Xeon (100k x 768: 4 s vs
  0.3 s); with BLAS from 20 queries on, in 1024 x 32768 blocks (a 128 MiB buffer), it matches torch.
  Not thread-safe: two threads searching FAISS indices at once may restore each other's values.
- `torch`: the matrix product plus `torch.topk` in blocks of up to 1024 queries x as many gallery rows as
  keep one block's similarities under `_CHUNK_ELEMENTS` (128 MiB), merging each block's top-k into the
  running one: memory stays bounded against a 1M-row gallery and the gallery is read once per query block
  (chunking over queries alone would read a 1M x 768 gallery three times per 100 queries); holds no copy.

`auto` takes faiss when it imports, else torch. Scores are float32 inner products (the evaluator ranks
float64 distances; float32 moves only near-ties of ~1e-7).

Ties, one rule for both backends: equal scores are ordered by ascending gallery row, and when several
rows share the k-th score, the lowest rows make the cut (a query whose (k+1)-th score equals its k-th is
searched again with a wider k until the tied run ends). "Equal" is per backend: the two compute the same
products in a different order, so scores agree to ~1e-6 and rows closer than that may swap between them.

Cross-modality (the VI-ReID setting, the default): a query of one modality ranks only the gallery rows of
the other; the gallery is split into one index per modality, so the filter costs nothing at query time.

Re-ranking (`rerank=True`) is k-reciprocal re-ranking, `mip_dist.eval.rerank.re_ranking`, with the
evaluator's k1=20, k2=6, lambda=0.3, applied to the full matrix of each query group (queries of one
modality and the gallery rows they search). It needs all pairwise distances among those queries and
gallery rows (~57 bytes per pair, time ~(Q+G)^2): a group with Q + G above `RERANK_MAX_ITEMS` (12,000:
about 8 GiB and a minute or two on a 2-core CPU) is refused with a `SearchError` before any work.
Re-ranked scores are minus the re-ranked distance (higher = closer, like cosine).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from mip_dist.eval.rerank import re_ranking

from .feature_file import MODALITIES, FeatureFile

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faiss", "torch")
RERANK_MAX_ITEMS = 12_000  # queries + gallery rows of one re-ranked group (see the module docstring)
RERANK_K1, RERANK_K2, RERANK_LAMBDA = 20, 6, 0.3  # the evaluator's (re_ranking's defaults)
_CHUNK_ELEMENTS = 1 << 25  # similarities per torch block (128 MiB of float32)
_QUERY_BLOCK = 1024  # queries per torch block
_FAISS_BLAS = {"distance_compute_blas_threshold": 20, "distance_compute_blas_query_bs": 1024,
               "distance_compute_blas_database_bs": 32768}  # see the module docstring

TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class SearchError(ValueError):
    """Inputs that cannot be searched (other model, other dimension, no modality, bad option); names the file."""


def faiss_available() -> bool:
    """Whether `import faiss` works (the `deploy` extra installs faiss-cpu)."""
    try:
        importlib.import_module("faiss")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """'auto' -> 'faiss' when it imports, else 'torch'; an unknown or unavailable choice is a SearchError."""
    if backend not in BACKENDS:
        raise SearchError(f"backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "faiss" if faiss_available() else "torch"
    if backend == "faiss" and not faiss_available():
        raise SearchError("backend 'faiss' asked for but faiss does not import (pip install faiss-cpu, "
                          "or use backend 'torch')")
    return backend


def _as_matrix(x: Union[torch.Tensor, np.ndarray], what: str) -> torch.Tensor:
    """A contiguous float32 CPU [N, D] tensor (no copy when it already is one)."""
    t = torch.as_tensor(x)
    if t.ndim != 2:
        raise SearchError(f"{what} must be a [N, D] matrix, got shape {tuple(t.shape)}")
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _order(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row sorted by score descending, equal scores by ascending gallery row (the tie rule)."""
    by_row = torch.argsort(indices, dim=1)
    scores, indices = scores.gather(1, by_row), indices.gather(1, by_row)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, by_score), indices.gather(1, by_score)


def _search_with_ties(topk: TopK, queries: torch.Tensor, k: int, ntotal: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-min(k, ntotal) of a backend's raw `topk`, with the module's tie rule whatever order it returns."""
    k = min(k, ntotal)
    if k <= 0 or queries.shape[0] == 0:
        return torch.empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.int64)
    wide = min(k + 1, ntotal)
    scores, indices = _order(*topk(queries, wide))
    if wide > k:
        for r in (scores[:, k] == scores[:, k - 1]).nonzero().flatten().tolist():  # the k-th score is tied
            width = wide
            while True:
                width = min(2 * width, ntotal)
                s, i = _order(*topk(queries[r:r + 1], width))
                if width == ntotal or s[0, width - 1] < s[0, k - 1]:
                    break
            scores[r, :k], indices[r, :k] = s[0, :k], i[0, :k]
    return scores[:, :k].contiguous(), indices[:, :k].contiguous()


class TorchIndex:
    """Exact inner-product index in plain torch: the gallery matrix itself, searched chunk by chunk."""

    backend = "torch"

    def __init__(self, gallery: Union[torch.Tensor, np.ndarray]):
        self._gallery = _as_matrix(gallery, "gallery")

    @property
    def ntotal(self) -> int:
        """Rows in the index."""
        return int(self._gallery.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self._gallery.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored rows (shared with the caller's tensor when it was float32 already)."""
        return self._gallery.numel() * 4

    def _topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw top-k per query: blocks of up to 1024 queries x as many gallery rows as the budget allows, each
        block's top-k merged into the running one (the gallery is read once per query block, as FAISS does)."""
        q_step = min(max(1, queries.shape[0]), _QUERY_BLOCK)
        g_step = max(k, _CHUNK_ELEMENTS // q_step)
        scores, indices = [], []
        for qs in range(0, queries.shape[0], q_step):
            q = queries[qs:qs + q_step]
            best_s, best_i = torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.int64)
            for gs in range(0, self.ntotal, g_step):
                top = torch.topk(q @ self._gallery[gs:gs + g_step].t(), min(k, self.ntotal - gs), dim=1,
                                 sorted=False)
                cand_s, cand_i = torch.cat([best_s, top.values], 1), torch.cat([best_i, top.indices + gs], 1)
                if cand_s.shape[1] > k:
                    keep = torch.topk(cand_s, k, dim=1, sorted=False).indices
                    cand_s, cand_i = cand_s.gather(1, keep), cand_i.gather(1, keep)
                best_s, best_i = cand_s, cand_i
            scores.append(best_s)
            indices.append(best_i)
        return torch.cat(scores), torch.cat(indices)

    def search(self, queries: Union[torch.Tensor, np.ndarray], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, k], gallery rows [Q, k]), scores descending; k is capped at the index size."""
        q = _check_queries(queries, self.dim)
        return _search_with_ties(self._topk, q, k, self.ntotal)


class FaissIndex:
    """Exact inner-product index in FAISS (`IndexFlatIP`): cosine similarity on L2-normalised rows."""

    backend = "faiss"

    def __init__(self, gallery: Union[torch.Tensor, np.ndarray]):
        import faiss

        g = _as_matrix(gallery, "gallery")
        self._index = faiss.IndexFlatIP(int(g.shape[1]))
        self._index.add(g.numpy())

    @property
    def ntotal(self) -> int:
        """Rows in the index."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return int(self._index.d)

    @property
    def nbytes(self) -> int:
        """Bytes of the index's own copy of the rows."""
        return self.ntotal * self.dim * 4

    def _topk(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw top-k per query from FAISS, under `_FAISS_BLAS`."""
        with _faiss_blas():
            scores, indices = self._index.search(np.ascontiguousarray(queries.numpy()), k)
        return torch.from_numpy(scores), torch.from_numpy(indices)

    def search(self, queries: Union[torch.Tensor, np.ndarray], k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [Q, k], gallery rows [Q, k]), scores descending; k is capped at the index size."""
        q = _check_queries(queries, self.dim)
        return _search_with_ties(self._topk, q, k, self.ntotal)


Index = Union[TorchIndex, FaissIndex]


@contextlib.contextmanager
def _faiss_blas() -> Iterator[None]:
    """FAISS's BLAS block settings set to `_FAISS_BLAS` for one search, then restored (see the module docstring)."""
    import faiss

    saved = {name: getattr(faiss.cvar, name) for name in _FAISS_BLAS}
    try:
        for name, value in _FAISS_BLAS.items():
            setattr(faiss.cvar, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(faiss.cvar, name, value)


def _check_queries(queries: Union[torch.Tensor, np.ndarray], dim: int) -> torch.Tensor:
    """Queries as float32 [Q, dim], or a SearchError naming both dimensions."""
    q = _as_matrix(queries, "queries")
    if q.shape[1] != dim:
        raise SearchError(f"queries have dimension {q.shape[1]} but the index holds dimension {dim}")
    return q


def build_index(gallery: Union[torch.Tensor, np.ndarray], backend: str = "auto", name: str = "gallery") -> Index:
    """An exact inner-product index over the gallery rows with `.search(queries, k)`; logs the backend."""
    chosen = resolve_backend(backend)
    index: Index = FaissIndex(gallery) if chosen == "faiss" else TorchIndex(gallery)
    log.info("search index of %s: %s, %d rows x %d (%.1f MiB)%s", name, chosen, index.ntotal, index.dim,
             index.nbytes / 2**20, " (faiss does not import)" if backend == "auto" and chosen == "torch" else "")
    return index


@dataclass
class SearchResult:
    """Top-k of every query: gallery rows and scores (higher = closer), -1 / -inf where a query has fewer."""

    scores: torch.Tensor  # [Q, k] float32: cosine similarity, or minus the re-ranked distance
    indices: torch.Tensor  # [Q, k] int64 gallery rows; -1 pads a query with fewer than k candidates
    score_kind: str  # "cosine" or "-rerank_distance"
    backend: str  # "faiss", "torch", or "rerank"
    cross_modality: bool


def item_modalities(items: Sequence[dict[str, Any]], where: str) -> list[str]:
    """Each item's modality ('visible' / 'infrared'); a missing or unknown one is a SearchError naming the row."""
    out = []
    for row, item in enumerate(items):
        m = item.get("modality") if isinstance(item, dict) else None
        if m not in MODALITIES:
            path = item.get("path", "?") if isinstance(item, dict) else "?"
            raise SearchError(f"{where}: row {row} ({path}) has modality {m!r}, not one of {', '.join(MODALITIES)}; "
                              "cross-modality search needs every row's modality (--all-modalities / cross_modality=False "
                              "ranks every row)")
        out.append(m)
    return out


def describe(features: FeatureFile, default: str) -> str:
    """How errors name a feature file: 'feature file <path>', or `default` for features not read from a file."""
    return f"feature file {features.path}" if features.path is not None else default


def check_compatible(query: FeatureFile, gallery: FeatureFile, query_name: Optional[str] = None) -> None:
    """Query and gallery features come from the same model and have the same dimension, else SearchError."""
    qname = query_name or describe(query, "the query features")
    gname = describe(gallery, "the gallery features")
    qsha, gsha = query.model_sha256, gallery.model_sha256
    if qsha and gsha and qsha != gsha:
        raise SearchError(f"{qname} was made by model sha256 {qsha[:12]}..., {gname} by {gsha[:12]}...: "
                          "features of different models cannot be compared")
    if not (qsha and gsha):
        log.warning("%s records no model sha256: cannot check that query and gallery come from the same model",
                    qname if not qsha else gname)
    qcfg, gcfg = query.model.get("config_sha256"), gallery.model.get("config_sha256")
    if qsha and qsha == gsha and qcfg != gcfg:
        raise SearchError(f"{qname} and {gname} come from one model file read with different config files "
                          f"({query.model.get('config') or 'none'} vs {gallery.model.get('config') or 'none'}): "
                          "their features cannot be compared")
    if query.dim != gallery.dim:
        raise SearchError(f"{qname} has dimension {query.dim}, {gname} has {gallery.dim}: "
                          "features of different sizes cannot be compared")


def _other(modality: str) -> str:
    """The modality a cross-modality query searches."""
    return MODALITIES[1 - MODALITIES.index(modality)]


class GalleryIndex:
    """A gallery split into one exact index per modality (cross-modality search) or one for all rows."""

    def __init__(self, features: torch.Tensor, modalities: Optional[Sequence[str]] = None, *,
                 backend: str = "auto", cross_modality: bool = True, name: str = "gallery"):
        self.name = name
        self.features = _as_matrix(features, name)
        self.cross_modality = cross_modality
        self.backend = resolve_backend(backend)
        if self.features.shape[0] == 0:
            raise SearchError(f"{name}: the gallery is empty")
        self.groups: dict[Optional[str], torch.Tensor] = {}
        if cross_modality:
            if modalities is None or len(modalities) != self.features.shape[0]:
                raise SearchError(f"{name}: cross-modality search needs one modality per gallery row")
            labels = np.asarray(modalities)
            for m in MODALITIES:
                rows = np.flatnonzero(labels == m)
                if rows.size:
                    self.groups[m] = torch.from_numpy(rows)
        else:
            self.groups[None] = torch.arange(self.features.shape[0])
        self._indices: dict[Optional[str], Index] = {}

    def rows_for(self, query_modality: Optional[str]) -> tuple[Optional[str], torch.Tensor]:
        """(group key, gallery rows) a query of this modality searches; SearchError when there are none."""
        if not self.cross_modality:
            return None, self.groups[None]
        key = _other(query_modality)
        if key not in self.groups:
            raise SearchError(f"{self.name}: the gallery holds no {key} rows, so a {query_modality} query has "
                              "nothing to match across modalities (--all-modalities / cross_modality=False compares within one)")
        return key, self.groups[key]

    def index_for(self, key: Optional[str]) -> Index:
        """The index of one group, built on first use."""
        if key not in self._indices:
            rows = self.groups[key]
            part = self.features if rows.numel() == self.features.shape[0] else self.features[rows]
            self._indices[key] = build_index(part, self.backend, f"{key} rows of {self.name}" if key else self.name)
        return self._indices[key]

    def _query_groups(self, modalities: Optional[Sequence[str]], n: int) -> dict[Optional[str], torch.Tensor]:
        """Query rows per gallery group they search."""
        if not self.cross_modality:
            return {None: torch.arange(n)}
        if modalities is None or len(modalities) != n:
            raise SearchError("cross-modality search needs one modality per query")
        labels = np.asarray(modalities)
        out: dict[Optional[str], torch.Tensor] = {}
        for m in MODALITIES:
            rows = np.flatnonzero(labels == m)
            if rows.size:
                key, _ = self.rows_for(m)
                out[key] = torch.from_numpy(rows)
        return out

    def search(self, queries: torch.Tensor, modalities: Optional[Sequence[str]], k: int) -> SearchResult:
        """Top-k gallery rows of every query (of the other modality when cross-modality)."""
        queries = _check_queries(queries, self.features.shape[1])
        if k < 1:
            raise SearchError(f"top-k must be at least 1, got {k}")
        groups = self._query_groups(modalities, queries.shape[0])
        width = min(k, max((self.groups[g].numel() for g in groups), default=0))
        scores = torch.full((queries.shape[0], width), float("-inf"))
        indices = torch.full((queries.shape[0], width), -1, dtype=torch.int64)
        for key, q_rows in groups.items():
            s, i = self.index_for(key).search(queries[q_rows], width)
            scores[q_rows, :s.shape[1]] = s
            indices[q_rows, :i.shape[1]] = self.groups[key][i]
        return SearchResult(scores, indices, "cosine", self.backend, self.cross_modality)

    def rerank_search(self, queries: torch.Tensor, modalities: Optional[Sequence[str]], k: int, *,
                      k1: int = RERANK_K1, k2: int = RERANK_K2, lambda_value: float = RERANK_LAMBDA,
                      max_items: int = RERANK_MAX_ITEMS) -> SearchResult:
        """Top-k by k-reciprocal re-ranked distance over each query group's full matrix (size-limited)."""
        queries = _check_queries(queries, self.features.shape[1])
        if k < 1:
            raise SearchError(f"top-k must be at least 1, got {k}")
        groups = self._query_groups(modalities, queries.shape[0])
        for key, q_rows in groups.items():
            total = q_rows.numel() + self.groups[key].numel()
            if total > max_items:
                what = f"{key} gallery rows" if key else "gallery rows"
                raise SearchError(f"re-ranking {q_rows.numel()} queries against {self.groups[key].numel()} {what} of "
                                  f"{self.name} needs all {total} x {total} distances: above the limit of "
                                  f"{max_items} images (about {max_items**2 * 57 / 2**30:.0f} GiB); search without "
                                  "re-ranking or with fewer queries / a smaller gallery")
        width = min(k, max((self.groups[g].numel() for g in groups), default=0))
        scores = torch.full((queries.shape[0], width), float("-inf"))
        indices = torch.full((queries.shape[0], width), -1, dtype=torch.int64)
        for key, q_rows in groups.items():
            g_rows = self.groups[key]
            log.info("re-ranking %d queries x %d gallery rows (k1=%d, k2=%d, lambda=%g)", q_rows.numel(),
                     g_rows.numel(), k1, k2, lambda_value)
            dist = re_ranking(queries[q_rows], self.features[g_rows], k1=k1, k2=k2, lambda_value=lambda_value)
            order = torch.sort(dist, dim=1, stable=True).indices[:, :width]
            scores[q_rows, :order.shape[1]] = -dist.gather(1, order)
            indices[q_rows, :order.shape[1]] = g_rows[order]
        return SearchResult(scores, indices, "-rerank_distance", "rerank", self.cross_modality)


def search_features(query: FeatureFile, gallery: FeatureFile, k: int = 10, *, cross_modality: bool = True,
                    rerank: bool = False, backend: str = "auto", k1: int = RERANK_K1, k2: int = RERANK_K2,
                    lambda_value: float = RERANK_LAMBDA, max_rerank_items: int = RERANK_MAX_ITEMS,
                    query_name: Optional[str] = None) -> SearchResult:
    """Top-k gallery rows of every query row after checking that the two files can be compared."""
    check_compatible(query, gallery, query_name)
    qname, gname = query_name or describe(query, "the query features"), describe(gallery, "the gallery features")
    q_mod = item_modalities(query.items, qname) if cross_modality else None
    g_mod = item_modalities(gallery.items, gname) if cross_modality else None
    index = GalleryIndex(gallery.features, g_mod, backend=backend, cross_modality=cross_modality, name=gname)
    if rerank:
        return index.rerank_search(query.features, q_mod, k, k1=k1, k2=k2, lambda_value=lambda_value,
                                   max_items=max_rerank_items)
    return index.search(query.features, q_mod, k)
