"""Query and per-trial gallery selections of the standard VI-ReID protocols, built from index.json.

Every selection is a list of positions into `index["test_records"]` (records carry key, pid, the
dataset's 1-based camera number, modality 0 = infrared / 1 = visible, and path), so features are
extracted once and every setting and trial just indexes them.

Random galleries follow the reference data managers (mangye16/Cross-Modal-Re-ID-baseline
`process_gallery_sysu`, the LLCM authors' `process_gallery_llcm`): trial t draws with a fresh
`random.Random(t)`, visiting identities in ascending order, cameras in the listed order and each
(identity, camera) folder's images sorted by path, taking `choice` (single-shot) or
`sample(images, min(10, n))` (multi-shot, without replacement). Given the same image lists this
reproduces the reference galleries draw for draw. Seeds are recorded in every Setting.

Protocols:
- `sysu`: SYSU-MM01 standard. Query: all test images of IR cameras 3 and 6 (both search modes).
  Gallery: RGB cameras 1, 2, 4, 5 (all-search) or 1, 2 (indoor-search), single- or multi-shot,
  `trials` trials. Metric "sysu": cam3 -> cam2 removal, unique-identity CMC.
- `sysu_authors`: the variant the MIP authors evaluated with (their TransReID-based code): the same
  queries and gallery draws but ONE fixed gallery (seed 0) and NO cam3/cam2 removal; metric
  "plain" (plain CMC, TransReID `eval_func`-style). Settings are named `authors_*` so a number
  from this variant can never be mistaken for the standard protocol.
- `regdb`: visible->thermal and thermal->visible on the index's split: every test image of one
  modality against every test image of the other; no trials, no removal; metric "regdb".
- `llcm`: the LLCM authors' test script (ZYK100/LLCM `test.py` with `process_query_llcm` /
  `process_gallery_llcm`), both directions as they evaluate them; metric "llcm" (same identity and
  camera removal, unique-identity CMC), `trials` trials (seed = trial):
  - `infrared_to_visible` (their `test_mode=[1, 2]`): every near-infrared test image is a query;
    the gallery is one visible image per (identity, camera), drawn per trial.
  - `visible_to_infrared` (their `test_mode=[2, 1]`, the published VIS->IR column): their script
    draws one near-infrared image per (identity, camera) per trial and then SWAPS the roles in the
    distance matrix (`eval_llcm(-gall @ query.T, gall_label, query_label, ...)`): the drawn
    near-infrared images are the ranked queries and ALL visible test images are the gallery. We
    reproduce exactly that, so the numbers compare with published LLCM VIS->IR tables.
  - `visible_to_infrared_literal` (extra, NOT comparable with published tables): the direction
    the name says, every visible test image as a query against one near-infrared image per
    (identity, camera) per trial. Kept because it is what a deployment searching visible queries
    in an infrared gallery sees.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

INFRARED, VISIBLE = 0, 1
SYSU_INFRARED_CAMERAS = (3, 6)
SYSU_VISIBLE_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}
MULTI_SHOT = 10
PROTOCOL_NAMES = ("sysu", "sysu_authors", "regdb", "llcm")
# which protocols make sense for which index["dataset"] (synthetic trees use the SYSU layout)
DATASET_PROTOCOLS = {"sysu": {"sysu", "sysu_authors"}, "synthetic": {"sysu", "sysu_authors"},
                     "regdb": {"regdb"}, "llcm": {"llcm"}}
DEFAULT_PROTOCOL = {"sysu": "sysu", "synthetic": "sysu", "regdb": "regdb", "llcm": "llcm"}


class ProtocolError(ValueError):
    """An index that cannot support the requested protocol; the message says what is missing."""


@dataclass
class Setting:
    """One evaluation setting: queries, one gallery per trial (with its seed) and the metric rule."""

    name: str  # e.g. "all_single", "visible_to_thermal", "authors_all_single"
    protocol: str  # the family it came from: sysu | sysu_authors | regdb | llcm
    metric: str  # rank_metrics protocol: sysu | llcm | regdb | plain
    query: np.ndarray  # int64 positions into index["test_records"] (every trial's, or the union of query_draws)
    galleries: list[np.ndarray]  # one int64 position array per trial
    seeds: list[Optional[int]]  # seed of each trial's gallery draw (None: no randomness)
    description: str = ""
    counts: dict = field(default_factory=dict)  # sizes, for logs and results.json
    query_draws: Optional[list[np.ndarray]] = None  # per-trial queries when the QUERY side is drawn
    headline: bool = True  # False: an extra view that no published table reports
    swapped_roles: bool = False  # True: the name's gallery modality supplies the ranked queries (as published)

    @property
    def trials(self) -> int:
        """Number of gallery draws."""
        return len(self.galleries)

    def trial_query(self, trial: int) -> np.ndarray:
        """Queries of one trial: the drawn ones when the protocol draws the query side, else `query`."""
        return self.query_draws[trial] if self.query_draws is not None else self.query


class _Table:
    """Column view of the test records: pids, cameras, modalities and paths as arrays."""

    def __init__(self, records: Sequence[dict]):
        missing = [k for k in ("pid", "camera", "modality", "path") if records and k not in records[0]]
        if missing:
            raise ProtocolError(f"index test_records entries lack key(s) {missing}")
        self.pid = np.asarray([int(r["pid"]) for r in records], dtype=np.int64)
        self.cam = np.asarray([int(r["camera"]) for r in records], dtype=np.int64)
        self.mod = np.asarray([int(r["modality"]) for r in records], dtype=np.int64)
        self.path = [str(r["path"]) for r in records]

    def select(self, modality: int, cameras: Optional[Sequence[int]] = None) -> np.ndarray:
        """Positions of one modality (optionally some cameras) ordered by (pid, camera order, path)."""
        mask = self.mod == modality
        if cameras is not None:
            mask &= np.isin(self.cam, list(cameras))
        idx = np.flatnonzero(mask)
        cam_rank = {c: i for i, c in enumerate(cameras)} if cameras is not None else None
        return np.asarray(sorted(idx, key=lambda i: (self.pid[i], cam_rank[self.cam[i]] if cam_rank
                                                     else self.cam[i], self.path[i])), dtype=np.int64)

    def groups(self, idx: np.ndarray, cameras: Sequence[int]) -> list[list[int]]:
        """Positions grouped per (identity ascending, camera in `cameras` order), each sorted by path."""
        out: dict[tuple[int, int], list[int]] = {}
        for i in idx:
            out.setdefault((int(self.pid[i]), int(self.cam[i])), []).append(int(i))
        order = {c: n for n, c in enumerate(cameras)}
        keys = sorted(out, key=lambda k: (k[0], order[k[1]]))
        return [sorted(out[k], key=lambda i: self.path[i]) for k in keys]


def draw_gallery(groups: list[list[int]], seed: int, shots: int) -> np.ndarray:
    """One gallery: `shots` images per group drawn with random.Random(seed), reference-style."""
    rng = random.Random(seed)
    picked: list[int] = []
    for g in groups:
        if shots == 1:
            picked.append(rng.choice(g))
        else:
            picked.extend(rng.sample(g, min(shots, len(g))))
    return np.asarray(picked, dtype=np.int64)


def _check_gallery(name: str, gallery: np.ndarray, groups: list[list[int]], shots: int) -> None:
    """Counts: exactly min(shots, n) distinct images per (identity, camera) group present."""
    expected = sum(min(shots, len(g)) for g in groups)
    if len(gallery) != expected or len(set(gallery.tolist())) != expected:
        raise AssertionError(f"{name}: gallery holds {len(gallery)} images, expected {expected} "
                             f"({shots} per (identity, camera) of {len(groups)} groups)")


def _check_modality(t: _Table, idx: np.ndarray, modality: int, what: str) -> None:
    """Records of cameras that are fixed to a modality must carry that modality."""
    bad = idx[t.mod[idx] != modality]
    if bad.size:
        raise ProtocolError(f"{what}: record {t.path[bad[0]]} has modality {t.mod[bad[0]]}, "
                            f"expected {modality}")


def sysu_settings(records: Sequence[dict], trials: int = 10, *, authors: bool = False) -> list[Setting]:
    """SYSU-MM01 all/indoor x single/multi-shot (standard), or the authors' one fixed gallery."""
    t = _Table(records)
    query = t.select(INFRARED, SYSU_INFRARED_CAMERAS)
    if query.size == 0:
        raise ProtocolError("protocol 'sysu' needs infrared test records from cameras 3 and 6; none in the index")
    visible_all = np.flatnonzero(np.isin(t.cam, SYSU_VISIBLE_CAMERAS["all"]))
    _check_modality(t, visible_all, VISIBLE, "SYSU RGB cameras 1, 2, 4, 5")
    protocol = "sysu_authors" if authors else "sysu"
    seeds = [0] if authors else list(range(trials))
    settings = []
    for mode, cameras in SYSU_VISIBLE_CAMERAS.items():
        candidates = t.select(VISIBLE, cameras)
        if candidates.size == 0:
            raise ProtocolError(f"protocol {protocol!r} ({mode}-search) needs visible test records from "
                                f"cameras {cameras}; none in the index")
        groups = t.groups(candidates, cameras)
        for shot_name, shots in (("single", 1), ("multi", MULTI_SHOT)):
            name = f"{'authors_' if authors else ''}{mode}_{shot_name}"
            galleries = [draw_gallery(groups, s, shots) for s in seeds]
            for g in galleries:
                _check_gallery(name, g, groups, shots)
            if authors:
                desc = (f"SYSU-MM01 {mode}-search {shot_name}-shot, MIP authors' variant: one fixed "
                        "gallery (seed 0), NO cam3/cam2 removal, plain CMC; not the standard protocol")
            else:
                desc = (f"SYSU-MM01 {mode}-search {shot_name}-shot, standard protocol: {len(seeds)} "
                        "random galleries (seed = trial), cam3 -> cam2 removal, unique-identity CMC")
            settings.append(Setting(
                name=name, protocol=protocol, metric="plain" if authors else "sysu", query=query,
                galleries=galleries, seeds=list(seeds), description=desc,
                counts={"query": int(query.size), "gallery": int(galleries[0].size),
                        "gallery_groups": len(groups), "query_ids": int(np.unique(t.pid[query]).size)}))
    return settings


def regdb_settings(records: Sequence[dict], split: Optional[int] = None) -> list[Setting]:
    """RegDB visible->thermal and thermal->visible: all test images, no trials, no removal."""
    t = _Table(records)
    visible, thermal = t.select(VISIBLE), t.select(INFRARED)
    if visible.size == 0 or thermal.size == 0:
        raise ProtocolError(f"protocol 'regdb' needs visible and thermal test records; the index has "
                            f"{visible.size} visible and {thermal.size} thermal")
    split_txt = f" (split {split})" if split is not None else ""
    out = []
    for name, q, g in (("visible_to_thermal", visible, thermal), ("thermal_to_visible", thermal, visible)):
        out.append(Setting(
            name=name, protocol="regdb", metric="regdb", query=q, galleries=[g], seeds=[None],
            description=f"RegDB {name.replace('_', ' ')}{split_txt}: all test images, no removal",
            counts={"query": int(q.size), "gallery": int(g.size), "split": split}))
    return out


def _llcm_side(t: _Table, modality: int, what: str) -> tuple[np.ndarray, list[list[int]]]:
    """All test images of one LLCM modality and their (identity, camera) groups; raises when empty."""
    idx = t.select(modality)
    if idx.size == 0:
        name = "near-infrared" if modality == INFRARED else "visible"
        raise ProtocolError(f"protocol 'llcm' ({what}) needs {name} test records; the index has none")
    cameras = sorted(set(t.cam[idx].tolist()))
    return idx, t.groups(idx, cameras)


def _llcm_draws(groups: list[list[int]], trials: int, what: str) -> list[np.ndarray]:
    """One image per (identity, camera) per trial, drawn like `process_gallery_llcm(trial=t)`."""
    draws = [draw_gallery(groups, s, 1) for s in range(trials)]
    for d in draws:
        _check_gallery(what, d, groups, 1)
    return draws


def llcm_settings(records: Sequence[dict], trials: int = 10) -> list[Setting]:
    """LLCM as the authors' test script runs it: IR->VIS, VIS->IR (roles swapped), plus the literal VIS->IR."""
    t = _Table(records)
    seeds = list(range(trials))
    infrared, infrared_groups = _llcm_side(t, INFRARED, "near-infrared side")
    visible, visible_groups = _llcm_side(t, VISIBLE, "visible side")
    visible_draws = _llcm_draws(visible_groups, trials, "infrared_to_visible")
    infrared_draws = _llcm_draws(infrared_groups, trials, "visible_to_infrared")
    rule = "same identity+camera removal, unique-identity CMC"
    return [
        Setting(name="infrared_to_visible", protocol="llcm", metric="llcm", query=infrared, galleries=visible_draws,
                seeds=list(seeds),
                description=(f"LLCM IR->VIS as published (authors' test_mode=[1,2]): all near-infrared queries, "
                             f"{trials} random galleries of one visible image per (identity, camera), {rule}"),
                counts={"query": int(infrared.size), "gallery": int(visible_draws[0].size), "gallery_groups": len(visible_groups)}),
        Setting(name="visible_to_infrared", protocol="llcm", metric="llcm",
                query=np.unique(np.concatenate(infrared_draws)), galleries=[visible] * trials, seeds=list(seeds),
                query_draws=infrared_draws, swapped_roles=True,
                description=(f"LLCM VIS->IR as published (authors' test_mode=[2,1], roles swapped): per trial, "
                             f"one near-infrared image per (identity, camera) is ranked against ALL visible "
                             f"test images, {trials} trials, {rule}"),
                counts={"query": int(infrared_draws[0].size), "gallery": int(visible.size), "query_groups": len(infrared_groups)}),
        Setting(name="visible_to_infrared_literal", protocol="llcm", metric="llcm", query=visible, galleries=infrared_draws,
                seeds=list(seeds), headline=False,
                description=(f"LLCM literal VIS->IR (extra, not comparable with published tables): all visible "
                             f"queries, {trials} random galleries of one near-infrared image per (identity, "
                             f"camera), {rule}"),
                counts={"query": int(visible.size), "gallery": int(infrared_draws[0].size), "gallery_groups": len(infrared_groups)}),
    ]


def build_settings(index: dict, protocols: Sequence[str], trials: int = 10) -> list[Setting]:
    """Every Setting of the requested protocols for one test index; errors name what does not fit."""
    dataset = index.get("dataset")
    records = index.get("test_records")
    if not records:
        raise ProtocolError(f"index (dataset={dataset!r}) has no test_records")
    if trials < 1:
        raise ProtocolError(f"trials={trials} must be >= 1")
    settings: list[Setting] = []
    for p in protocols:
        if p not in PROTOCOL_NAMES:
            raise ProtocolError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOL_NAMES)}")
        allowed = DATASET_PROTOCOLS.get(str(dataset))
        if allowed is not None and p not in allowed:
            raise ProtocolError(f"protocol {p!r} does not apply to dataset {dataset!r}; "
                                f"use {' or '.join(sorted(allowed))}")
        if p == "sysu":
            settings += sysu_settings(records, trials)
        elif p == "sysu_authors":
            settings += sysu_settings(records, trials, authors=True)
        elif p == "regdb":
            settings += regdb_settings(records, index.get("regdb_split"))
        else:
            settings += llcm_settings(records, trials)
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ProtocolError(f"protocols {list(protocols)} were requested more than once")
    for s in settings:
        log.info("setting %s: %d queries, %d gallery images x %d trials (%s)", s.name, s.trial_query(0).size,
                 s.galleries[0].size, s.trials, s.metric)
    return settings
