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
    Returns {"sample": [...], "worst": [...]}, each entry {"key", "pid", "camera", "modality", "ap", "gallery":
    [{"key", "pid", "camera", "modality", "distance", "same"}]}; queries without a true match are not listed.
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
                        "modality": int(r["modality"]), "ap": _average_precision(same),
                        "gallery": [{"key": g_rec[g]["key"], "pid": int(g_pids[g]), "camera": int(g_cams[g]),
                                     "modality": int(g_rec[g]["modality"]), "distance": float(dist[qi, g]),
                                     "same": bool(s)} for g, s in zip(order[:top], same[:top])]})
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


MODALITY_SHORT = {0: "IR", 1: "VIS"}
RANK_LIST_ROW_IN, RANK_LIST_HEADER_IN, RANK_LIST_CELL_TITLE_IN = 2.3, 0.75, 0.45


def similarity_digits(rows: Sequence[Sequence[float]], lowest: int = 3, highest: int = 6) -> int:
    """Fewest decimals (lowest..highest) at which neighbouring values of every ranked list still differ,
    so a list of near-equal similarities does not read as one repeated number."""
    for digits in range(lowest, highest + 1):
        if all(round(a, digits) != round(b, digits) for row in rows for a, b in zip(row, row[1:]) if a != b):
            return digits
    return highest


def rank_list_cell_box(row: int, col: int, rows: int, cols: int) -> tuple[float, float, float, float]:
    """(left, bottom, width, height) in figure fractions of the image of cell (row, col): columns split the
    width evenly; rows split the height below a fixed header band (tests find each frame from this)."""
    height = rows * RANK_LIST_ROW_IN + RANK_LIST_HEADER_IN
    slot = RANK_LIST_ROW_IN / height
    top = 1 - RANK_LIST_HEADER_IN / height - row * slot - RANK_LIST_CELL_TITLE_IN / height
    box_h = slot - (RANK_LIST_CELL_TITLE_IN + 0.1) / height
    return col / cols + 0.005, top - box_h, 1 / cols - 0.01, box_h


def rank_list_labels(entry: dict, digits: int) -> list[str]:
    """Cell titles of one ranked list: the query's identity, modality, camera and AP, then each gallery
    image's identity, modality, camera and cosine similarity to the query (higher = closer)."""
    labels = [f"QUERY id {entry['pid']}\n{MODALITY_SHORT.get(entry.get('modality'), '?')} cam{entry['camera']}"
              f"\nAP {entry['ap']:.2f}"]
    for rank, g in enumerate(entry["gallery"], 1):
        labels.append(f"#{rank} id {g['pid']}\n{MODALITY_SHORT.get(g.get('modality'), '?')} cam{g['camera']}"
                      f"\ncos {-g['distance']:.{digits}f}")
    return labels


def rank_list_figure(entries: Sequence[dict], images: dict[str, dict], title: str = "", subtitle: str = "",
                     top: int = RANK_LIST_TOP) -> Figure:
    """One row per query: the query, then its top-`top` gallery images framed green (same id) or red, each
    titled by `rank_list_labels`; the header says what the number is and, via `subtitle`, whose roles."""
    rows = max(1, len(entries))
    cols = top + 1
    size = next((tuple(v["image"].shape[-2:]) for v in images.values()), (128, 64))
    fig = Figure(figsize=(cols * 1.0, rows * RANK_LIST_ROW_IN + RANK_LIST_HEADER_IN))
    digits = similarity_digits([[-g["distance"] for g in e["gallery"]] for e in entries])
    for r, e in enumerate(entries):
        colours = [None] + [FRAME_COLOURS[g["same"]] for g in e["gallery"]]
        for c, (item, colour, label) in enumerate(zip([e] + list(e["gallery"]), colours, rank_list_labels(e, digits))):
            ax = fig.add_axes(rank_list_cell_box(r, c, rows, cols))
            ax.imshow(_framed(images.get(item["key"]), colour, size), interpolation="nearest", aspect="auto")
            ax.set_title(label, fontsize=6)
            ax.axis("off")
    legend = ("cos = cosine similarity of query and gallery features (higher = closer; ranked by it, "
              "the protocol's removal rule applied); frame green = same identity, red = another")
    header = "\n".join(t for t in (subtitle, legend) if t)
    height = rows * RANK_LIST_ROW_IN + RANK_LIST_HEADER_IN
    if title:
        fig.suptitle(title, fontsize=8, y=1 - 0.04 / height, va="top")
    fig.text(0.5, 1 - 0.22 / height, header, ha="center", va="top", fontsize=6, wrap=True)
    return fig


def plot_rank_lists(entries: Sequence[dict], images: dict[str, dict], path: str | Path, title: str = "",
                    top: int = RANK_LIST_TOP, subtitle: str = "") -> Path:
    """`rank_list_figure` written as a PNG (cells on the fixed grid of `rank_list_cell_box`)."""
    fig = rank_list_figure(entries, images, title=title, subtitle=subtitle, top=top)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _modalities(records: Sequence[dict], positions: Sequence[int]) -> str:
    """'near-infrared', 'visible' or both, for the images at `positions`."""
    names = {0: "infrared", 1: "visible"}
    found = sorted({int(records[i]["modality"]) for i in positions})
    return " + ".join(names.get(m, str(m)) for m in found) or "no"


def rank_list_subtitle(setting, records: Sequence[dict], trial: int = 0) -> str:
    """Who queries whom in this setting, and why when the roles are swapped against its name."""
    query, gallery = setting.trial_query(trial), setting.galleries[trial]
    roles = (f"queries: {len(query)} {_modalities(records, query)} images; gallery: {len(gallery)} "
             f"{_modalities(records, gallery)} images")
    if setting.swapped_roles:
        return (f"{roles}. Roles swapped as published (the LLCM authors' test_mode=[2, 1] ranks the drawn "
                "near-infrared images against all visible images): comparable with published VIS->IR figures")
    if not setting.headline:
        return f"{roles}. Extra view, not comparable with published tables"
    return roles


def rank_list_figures(lists: dict[str, dict], images: dict[str, dict], settings: Sequence, records: Sequence[dict],
                      out: str | Path, prefix: str = "", trial: int = 0) -> list[Path]:
    """ranklist_<prefix><setting>.png (sample queries) and worst_ap_<prefix><setting>.png (lowest AP) for
    each setting in `lists` (see `rank_lists`), each titled with its setting, trial and seed."""
    written = []
    for s in settings:
        if s.name not in lists:
            continue
        seed = s.seeds[trial] if trial < len(s.seeds) else None
        when = f"trial {trial}" + (f", seed {seed}" if seed is not None else "")
        subtitle = rank_list_subtitle(s, records, trial)
        for kind, stem, what in (("sample", "ranklist", "sample queries"), ("worst", "worst_ap",
                                                                             "lowest average precision")):
            written.append(plot_rank_lists(lists[s.name][kind], images, Path(out) / f"{stem}_{prefix}{s.name}.png",
                                           title=f"{s.name}: {what} ({when})", subtitle=subtitle))
    return written
