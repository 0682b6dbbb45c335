"""Readable evaluation figures: CMC curves, rank lists, t-SNE of instance prompts, CLS attention overlays.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so no
global backend is switched and nothing needs a display.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Optional, Sequence

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .metrics import keep_mask, pairwise_distance

log = logging.getLogger(__name__)

MODALITY_MARKERS = {0: ("o", "infrared"), 1: ("^", "visible")}


def _save(fig: Figure, path: str | Path) -> Path:
    """Render with Agg and write a PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_cmc(results: dict, path: str | Path, title: str = "CMC") -> Path:
    """One mean CMC curve (percent, ranks 1..max_rank) per setting of an evaluation result dict."""
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    settings = {k: v for k, v in results.items() if isinstance(v, dict) and "cmc" in v}
    if not settings:
        raise ValueError("plot_cmc: the results hold no setting with a 'cmc' curve")
    for name, res in settings.items():
        cmc = np.asarray(res["cmc"])
        ax.plot(np.arange(1, len(cmc) + 1), cmc, marker=".", label=f"{name} (R1 {res['R1']:.1f}, mAP {res['mAP']:.1f})")
    ax.set_xlabel("rank")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("matching rate (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


@torch.no_grad()
def instance_prompt_embedding(model: torch.nn.Module, loader: Iterable[dict], *, device: torch.device | str,
                              max_ids: int = 10, max_per_id: int = 24, layer: int = -1,
                              seed: int = 0) -> Optional[dict]:
    """2-D t-SNE of the mean instance prompt of prompted layer `layer`, for the first `max_ids` identities.

    Reads `MIPOutput.instance_prompts` from the model's forward (list per layer of [B, C]). Returns
    {"embedding" [N, 2], "pid" [N], "modality" [N]} or None when the model has no instance prompts.
    """
    from sklearn.manifold import TSNE

    device = torch.device(device)
    was_training = model.training
    model.eval()
    vecs, pids, mods = [], [], []
    counts: dict[int, int] = {}
    try:
        for batch in loader:
            pid = torch.as_tensor(batch["pid"]).tolist()
            wanted = [i for i, p in enumerate(pid) if (p in counts or len(counts) < max_ids)
                      and counts.get(p, 0) < max_per_id]
            if not wanted:
                if len(counts) >= max_ids and all(c >= max_per_id for c in counts.values()):
                    break
                continue
            sel = torch.as_tensor(wanted)
            images = batch["images"][sel].to(device)
            modality = torch.as_tensor(batch["modality"])[sel].to(device=device, dtype=torch.long)
            camera = torch.as_tensor(batch["camera"])[sel].to(device=device, dtype=torch.long) - 1
            prompts = model(images, modality, camera).instance_prompts
            if not prompts:
                log.warning("t-SNE skipped: the model produces no instance prompts (IPG off)")
                return None
            vecs.append(prompts[layer].float().cpu())
            for i in wanted:
                counts[pid[i]] = counts.get(pid[i], 0) + 1
                pids.append(pid[i])
            mods += modality.cpu().tolist()
    finally:
        model.train(was_training)
    if len(pids) < 5:
        log.warning("t-SNE skipped: only %d images collected", len(pids))
        return None
    x = torch.cat(vecs).numpy()
    perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    return {"embedding": emb, "pid": np.asarray(pids), "modality": np.asarray(mods)}


def plot_tsne(embedding: np.ndarray, pids: np.ndarray, modality: np.ndarray, path: str | Path,
              title: str = "t-SNE of instance prompts") -> Path:
    """Scatter coloured by identity, marker by modality (circle infrared, triangle visible)."""
    fig = Figure(figsize=(6, 6))
    ax = fig.add_subplot(1, 1, 1)
    ids = sorted(set(pids.tolist()))
    colours = {p: i for i, p in enumerate(ids)}
    cmap = matplotlib.colormaps["tab10" if len(ids) <= 10 else "tab20"]
    handles = []
    for mod, (marker, label) in MODALITY_MARKERS.items():
        m = modality == mod
        if m.any():
            ax.scatter(embedding[m, 0], embedding[m, 1], c=[cmap(colours[p] % cmap.N) for p in pids[m]],
                       marker=marker, s=28, edgecolors="k", linewidths=0.3)
            handles.append(Line2D([], [], marker=marker, color="grey", linestyle="", label=label))
    ax.legend(handles=handles, loc="best", fontsize=8)
    ax.set_title(f"{title} ({len(ids)} identities)")
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def select_pairs(distmat: torch.Tensor, q_pids: Sequence[int], g_pids: Sequence[int], k: int = 4) -> list[tuple[int, int, bool]]:
    """Up to k (query row, rank-1 gallery column, is_true_match) for queries of distinct identities."""
    seen: set[int] = set()
    out = []
    top = distmat.argmin(dim=1).cpu().tolist()
    for q, g in enumerate(top):
        if q_pids[q] in seen:
            continue
        seen.add(q_pids[q])
        out.append((q, g, bool(q_pids[q] == g_pids[g])))
        if len(out) == k:
            break
    return out


def collect_images(loader: Iterable[dict], keys: Iterable[str]) -> dict[str, dict]:
    """The loader's image, modality, camera and pid of each wanted key (one pass, stops when all found)."""
    wanted = set(keys)
    found: dict[str, dict] = {}
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            if key in wanted and key not in found:
                found[key] = {"image": batch["images"][i], "modality": int(batch["modality"][i]),
                              "camera": int(batch["camera"][i]), "pid": int(batch["pid"][i])}
        if len(found) == len(wanted):
            break
    return found


def _to_display(image: torch.Tensor) -> np.ndarray:
    """Normalised [3, H, W] (mean = std = 0.5) -> [H, W, 3] in [0, 1]."""
    return (image.float().cpu() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()


@torch.no_grad()
def attention_maps(model: torch.nn.Module, items: Sequence[dict], *, device: torch.device | str) -> list[np.ndarray]:
    """`model.cls_attention` of each item, upsampled to the image size and scaled to [0, 1]."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        images = torch.stack([it["image"] for it in items]).to(device)
        modality = torch.tensor([it["modality"] for it in items], device=device)
        camera = torch.tensor([it["camera"] - 1 for it in items], device=device)
        attn = model.cls_attention(images, modality, camera).float()  # [B, Hp, Wp]
    finally:
        model.train(was_training)
    up = F.interpolate(attn[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = up.flatten(1).amin(1)[:, None, None]
    hi = up.flatten(1).amax(1)[:, None, None]
    return list(((up - lo) / (hi - lo).clamp_min(1e-12)).cpu().numpy())


def plot_attention_pairs(model: torch.nn.Module, pairs: Sequence[tuple[dict, dict, bool]], path: str | Path, *,
                         device: torch.device | str) -> Path:
    """Rows of (query, query attention, rank-1 gallery, gallery attention), titled with ids and match."""
    if not pairs:
        raise ValueError("plot_attention_pairs: no pairs given")
    items = [it for q, g, _ in pairs for it in (q, g)]
    maps = attention_maps(model, items, device=device)
    fig = Figure(figsize=(8, 3.2 * len(pairs)))
    for row, (q, g, ok) in enumerate(pairs):
        for col, (it, amap, role) in enumerate(((q, maps[2 * row], "query"), (g, maps[2 * row + 1], "rank-1"))):
            img = _to_display(it["image"])
            name = MODALITY_MARKERS[it["modality"]][1]
            ax = fig.add_subplot(len(pairs), 4, 4 * row + 2 * col + 1)
            ax.imshow(img)
            ax.set_title(f"{role} id {it['pid']} ({name}, cam{it['camera']})", fontsize=7)
            ax.axis("off")
            ax = fig.add_subplot(len(pairs), 4, 4 * row + 2 * col + 2)
            ax.imshow(img)
            ax.imshow(amap, cmap="jet", alpha=0.5)
            ax.set_title("CLS attention" + ("" if col == 0 else (" - match" if ok else " - wrong")), fontsize=7)
            ax.axis("off")
    return _save(fig, path)


FRAME_COLOURS = {True: (0.0, 1.0, 0.0), False: (1.0, 0.0, 0.0)}  # same identity: green, otherwise red
RANK_LIST_TOP = 10


def _average_precision(same: np.ndarray) -> float:
    """AP of one kept ranked list given its same-identity flags (0 when it holds no match)."""
    pos = np.flatnonzero(same) + 1.0
    return float(np.mean(np.arange(1, pos.size + 1) / pos)) if pos.size else 0.0


def rank_lists(feats: torch.Tensor, row_of: dict[str, int], records: Sequence[dict], setting,
               num_queries: int = 8, num_worst: int = 8, top: int = RANK_LIST_TOP, trial: int = 0) -> dict:
    """Top-`top` kept gallery entries of sample queries and of the lowest-AP queries of one trial.

    Ranks like the metric (float64 distances, stable order, the setting's removal rule applied).
    Returns {"sample": [...], "worst": [...]}, each entry {"key", "pid", "camera", "ap", "gallery":
    [{"key", "pid", "camera", "distance", "same"}]}; queries without a true match are not listed.
    """
    query, gallery = setting.trial_query(trial), setting.galleries[trial]
    q_rec = [records[i] for i in query]
    g_rec = [records[i] for i in gallery]
    dist = pairwise_distance(feats[[row_of[r["key"]] for r in q_rec]],
                             feats[[row_of[r["key"]] for r in g_rec]]).cpu().numpy()
    g_pids = np.asarray([int(r["pid"]) for r in g_rec])
    g_cams = np.asarray([int(r["camera"]) for r in g_rec])
    keep = keep_mask(setting.metric, torch.as_tensor([int(r["pid"]) for r in q_rec]),  # the metric's removal rule
                     torch.as_tensor([int(r["camera"]) for r in q_rec]), torch.as_tensor(g_pids),
                     torch.as_tensor(g_cams))
    entries = []
    for qi, r in enumerate(q_rec):
        order = np.argsort(dist[qi], kind="stable")
        if keep is not None:
            order = order[keep[qi].numpy()[order]]
        same = g_pids[order] == int(r["pid"])
        if not same.any():
            continue
        entries.append({"key": r["key"], "pid": int(r["pid"]), "camera": int(r["camera"]),
                        "ap": _average_precision(same),
                        "gallery": [{"key": g_rec[g]["key"], "pid": int(g_pids[g]), "camera": int(g_cams[g]),
                                     "distance": float(dist[qi, g]), "same": bool(s)}
                                    for g, s in zip(order[:top], same[:top])]})
    pick = np.unique(np.linspace(0, len(entries) - 1, min(num_queries, len(entries))).astype(int)) if entries else []
    worst = sorted(range(len(entries)), key=lambda i: (entries[i]["ap"], i))[:num_worst]
    return {"sample": [entries[i] for i in pick], "worst": [entries[i] for i in worst]}


def keys_in(lists: dict) -> set[str]:
    """Every image key a rank-list figure needs (queries and their listed gallery entries)."""
    return {k for part in lists.values() for e in part for k in [e["key"]] + [g["key"] for g in e["gallery"]]}


def _framed(image: Optional[dict], colour: Optional[tuple[float, float, float]], size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] display image (grey when missing) inside a solid frame of `colour` (none for a query)."""
    img = _to_display(image["image"]) if image is not None else np.full((*size, 3), 0.5)
    if colour is None:
        return img
    border = max(3, img.shape[0] // 16)
    out = np.empty((img.shape[0] + 2 * border, img.shape[1] + 2 * border, 3))
    out[:] = colour
    out[border:-border, border:-border] = img
    return out


def plot_rank_lists(entries: Sequence[dict], images: dict[str, dict], path: str | Path, title: str = "",
                    top: int = RANK_LIST_TOP) -> Path:
    """One row per query: the query, then its top-`top` gallery images framed green (same id) or red.

    Each gallery cell is titled with its id, camera and distance; the query cell with its id, camera and
    AP. Cells sit on a fixed grid (column j spans [j, j+1] / (top + 1) of the width), so tools and
    tests can find each cell's frame.
    """
    rows = max(1, len(entries))
    cols = top + 1
    size = next((tuple(v["image"].shape[-2:]) for v in images.values()), (128, 64))
    fig = Figure(figsize=(cols * 1.0, rows * 2.3 + 0.4))
    for r, e in enumerate(entries):
        cells = [(e, None, f"query id {e['pid']}\ncam{e['camera']} AP {e['ap']:.2f}")]
        cells += [(g, FRAME_COLOURS[g["same"]], f"id {g['pid']} cam{g['camera']}\nd={g['distance']:.3f}") for g in e["gallery"]]
        for c, (item, colour, label) in enumerate(cells):
            ax = fig.add_axes((c / cols + 0.005, 1 - (r + 1) / rows * 0.9 - 0.02, 1 / cols - 0.01, 0.9 / rows * 0.78))
            ax.imshow(_framed(images.get(item["key"]), colour, size), interpolation="nearest", aspect="auto")
            ax.set_title(label, fontsize=6)
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8, y=0.995)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path
