"""Search a gallery feature file for query features or query images: print the top-k, write the table and figures.

    python launch/search.py --gallery gallery.safetensors --query query.safetensors [--topk 10] [--out DIR]
    python launch/search.py --gallery gallery.safetensors --query-images q1.jpg q_dir/ --model model_best.pt \\
                            --modality infrared [--camera 3]
        [--rerank] [--all-modalities] [--backend auto|faiss|torch] [--show 5] [--figures 8] [--debug]

Feature files come from launch/extract.py (`mip_dist.inference.feature_file`). By default a query ranks only
the gallery images of the other modality (visible <-> infrared, the VI-ReID setting); --all-modalities ranks
every gallery image. The score is the cosine similarity (higher = closer); with --rerank it is minus the
k-reciprocal re-ranked distance (the evaluator's k1=20, k2=6, lambda=0.3; refused above --rerank-limit, 12,000
queries + gallery images of one modality by default, see `mip_dist.inference.search`).

Writes into --out (default ./search_results): results.json and results.csv (every query, every rank) and
ranklist_<n>.png for the first --figures queries (query, then its top-k with modality, camera and score;
green / red frames where both identities are known; a grey tile where an image file cannot be read).
Prints the top-k of the first --show queries. Errors: one `error:` line and exit code 2 (--debug or
MIP_DEBUG=1 for the traceback).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from mip_dist.cli import debug_requested, run_command
from mip_dist.engine.export import DatasetChoiceError
from mip_dist.engine.safe_load import CheckpointError
from mip_dist.inference.feature_file import MODALITIES, FeatureFile, FeatureFileError, load_features
from mip_dist.inference.search import (BACKENDS, RERANK_MAX_ITEMS, SearchError, SearchResult, describe,
                                      search_features)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
TILE = (128, 64)  # rank-list tile height, width (the models' input shape)
SHORT = {"visible": "VIS", "infrared": "IR"}
CSV_FIELDS = ("query_row", "query_path", "query_modality", "query_camera", "query_pid", "rank", "score",
              "gallery_row", "gallery_path", "modality", "camera", "pid")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gallery", required=True, metavar="G.safetensors", help="gallery feature file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--query", metavar="Q.safetensors", help="query feature file (made by the same model)")
    src.add_argument("--query-images", nargs="+", metavar="PATH",
                     help="query image files or folders (searched for .jpg/.jpeg/.png/.bmp); needs --model and "
                          "--modality")
    p.add_argument("--model", default=None, help="model file that made the gallery features (with --query-images)")
    p.add_argument("--config", default=None, help="with --model the authors' checkpoint: the config file that made "
                                                 "the gallery features (what its tensors cannot tell)")
    p.add_argument("--dataset", default=None, help="with --model trained on several datasets: the one the "
                                                  "--query-images come from (its cameras)")
    p.add_argument("--modality", default=None, choices=MODALITIES, help="modality of the --query-images")
    p.add_argument("--camera", type=int, default=None, help="camera of the --query-images (optional)")
    p.add_argument("--topk", type=int, default=10, help="gallery matches per query (default 10)")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (small galleries only)")
    p.add_argument("--rerank-limit", type=int, default=RERANK_MAX_ITEMS, metavar="N",
                   help=f"re-rank only up to N queries + gallery images of one modality (default {RERANK_MAX_ITEMS:,}; "
                        "memory grows with N squared: about 57 bytes x N x N)")
    p.add_argument("--all-modalities", action="store_true",
                   help="rank every gallery image, not only those of the other modality")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="faiss, torch, or auto (faiss if installed)")
    p.add_argument("--out", default="search_results", help="output folder (default ./search_results)")
    p.add_argument("--show", type=int, default=5, help="queries whose top-k is printed (default 5; all in the CSV)")
    p.add_argument("--figures", type=int, default=8, help="rank-list PNGs written, first N queries (default 8)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    return p.parse_args(argv)


def image_paths(paths: Sequence[str]) -> list[str]:
    """Files as given, folders expanded to their image files (sorted); a missing path is a SearchError."""
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not found:
                raise SearchError(f"--query-images: folder {p} holds no {'/'.join(IMAGE_SUFFIXES)} images")
            out += found
        elif p.is_file():
            out.append(str(p))
        else:
            raise SearchError(f"--query-images: {p} does not exist")
    return out


def extract_queries(paths: Sequence[str], model: Optional[str], modality: Optional[str],
                    camera: Optional[int], config: Optional[str] = None, dataset: Optional[str] = None) -> FeatureFile:
    """Query features of image files, from the model (imported only here: it loads torch models)."""
    if model is None:
        raise SearchError("--query-images needs --model (the model file that made the gallery features)")
    if modality is None:
        raise SearchError(f"--query-images needs --modality ({' or '.join(MODALITIES)}): the model's prompts "
                          "depend on it and cross-modality search ranks the other one")
    files = image_paths(paths)
    from mip_dist.inference import FeatureExtractor

    extractor = FeatureExtractor(model, config=config, dataset=dataset)
    try:
        feats = extractor(files, modality=modality, camera=camera)
    except ValueError as exc:  # the extractor's user errors (an unreadable image, a camera the model lacks)
        raise SearchError(f"--query-images: {exc}") from exc
    if feats.ndim != 2 or feats.shape[0] != len(files):
        raise SearchError(f"the feature extractor returned {tuple(feats.shape)} features for {len(files)} images")
    items = [{"path": f, "modality": modality, "camera": camera, "pid": None} for f in files]
    return FeatureFile(feats.float().cpu(), items, dict(extractor.model_info))


def result_rows(query: FeatureFile, gallery: FeatureFile, result: SearchResult) -> list[dict[str, Any]]:
    """One record per query: the query item and its ranked gallery matches (padding dropped)."""
    rows = []
    scores, indices = result.scores.tolist(), result.indices.tolist()
    for q, item in enumerate(query.items):
        matches = [{"rank": r + 1, "score": s, "row": g, **{k: gallery.items[g].get(k) for k in
                                                             ("path", "modality", "camera", "pid")}}
                   for r, (s, g) in enumerate(zip(scores[q], indices[q])) if g >= 0]
        rows.append({"row": q, "query": {k: item.get(k) for k in ("path", "modality", "camera", "pid")},
                     "matches": matches})
    return rows


def write_tables(out: Path, rows: list[dict], header: dict) -> tuple[Path, Path]:
    """results.json (header + every query's matches) and results.csv (one line per query and rank)."""
    out.mkdir(parents=True, exist_ok=True)
    js = out / "results.json"
    js.write_text(json.dumps({**header, "queries": rows}, indent=1) + "\n")
    cs = out / "results.csv"
    with cs.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_FIELDS)
        for rec in rows:
            q = rec["query"]
            for m in rec["matches"]:
                w.writerow([rec["row"], q["path"], q["modality"], q["camera"], q["pid"], m["rank"],
                            f"{m['score']:.6f}", m["row"], m["path"], m["modality"], m["camera"], m["pid"]])
    return js, cs


def _label(item: dict) -> str:
    """'IR cam3 id 12' with the parts an item has."""
    parts = [SHORT.get(item.get("modality"), str(item.get("modality") or "?"))]
    if item.get("camera") is not None:
        parts.append(f"cam{item['camera']}")
    if item.get("pid") is not None:
        parts.append(f"id {item['pid']}")
    return " ".join(parts)


def format_query(rec: dict, score_kind: str) -> str:
    """A query's printed block: its path and label, then rank, score, modality, camera, pid, gallery path."""
    q = rec["query"]
    lines = [f"query {rec['row']}: {q['path']} ({_label(q)})",
             f"  {'rank':>4}  {'score' if score_kind == 'cosine' else '-dist':>8}  {'modality':<8}  {'camera':>6}  "
             f"{'pid':>6}  gallery path"]
    for m in rec["matches"]:
        cam = "-" if m["camera"] is None else m["camera"]
        pid = "-" if m["pid"] is None else m["pid"]
        lines.append(f"  {m['rank']:>4}  {m['score']:8.4f}  {str(m['modality']):<8}  {cam:>6}  {pid:>6}  {m['path']}")
    if not rec["matches"]:
        lines.append("  (no gallery candidates)")
    return "\n".join(lines)


def _resolve(path: Optional[str], base: Optional[Path]) -> Optional[Path]:
    """An item's image file: as written, else relative to its feature file's folder; None when neither exists."""
    if not path:
        return None
    p = Path(path)
    for cand in ([p] + ([base / p] if base is not None and not p.is_absolute() else [])):
        if cand.is_file():
            return cand
    return None


def load_tile(path: Optional[str], base: Optional[Path]) -> np.ndarray:
    """[H, W, 3] in [0, 1]: the image resized to the tile, or a grey tile when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    found = _resolve(path, base)
    if found is not None:
        try:
            with Image.open(found) as im:
                return np.asarray(im.convert("RGB").resize((TILE[1], TILE[0])), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError):
            pass
    return np.full((*TILE, 3), 0.5, dtype=np.float32)


def _framed(tile: np.ndarray, colour: Optional[tuple[float, float, float]]) -> np.ndarray:
    """The tile inside a frame of `colour` (a thin grey one when the identities are unknown)."""
    border = 4
    out = np.empty((tile.shape[0] + 2 * border, tile.shape[1] + 2 * border, 3), dtype=np.float32)
    out[:] = colour if colour is not None else (0.85, 0.85, 0.85)
    out[border:-border, border:-border] = tile
    return out


def plot_rank_list(rec: dict, path: Path, query_base: Optional[Path], gallery_base: Optional[Path],
                   score_kind: str, title: str = "") -> Path:
    """One PNG: the query, then its ranked gallery images titled with modality, camera, id and score."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mip_dist.eval.visualize import FRAME_COLOURS, similarity_digits

    matches = rec["matches"]
    cols = 1 + max(1, len(matches))
    fig = Figure(figsize=(cols * 1.0, 2.9))
    digits = similarity_digits([[m["score"] for m in matches]])
    name = "cos" if score_kind == "cosine" else "-dist"
    q = rec["query"]
    cells = [(load_tile(q["path"], query_base), None, f"QUERY\n{_label(q)}")]
    for m in matches:
        same = None if q["pid"] is None or m["pid"] is None else FRAME_COLOURS[q["pid"] == m["pid"]]
        cells.append((load_tile(m["path"], gallery_base), same, f"#{m['rank']} {_label(m)}\n{name} {m['score']:.{digits}f}"))
    for c, (tile, colour, label) in enumerate(cells):
        ax = fig.add_axes((c / cols + 0.005, 0.05, 1 / cols - 0.01, 0.62))
        ax.imshow(_framed(tile, colour), interpolation="nearest", aspect="auto")
        ax.set_title(label, fontsize=6)
        ax.axis("off")
    fig.suptitle(title or f"query {rec['row']}: {Path(str(q['path'])).name}", fontsize=7, y=0.98)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def modality_counts(items: Sequence[dict]) -> str:
    """'3 visible, 5 infrared' (other labels counted as they are)."""
    counts: dict[str, int] = {}
    for it in items:
        key = str(it.get("modality"))
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {m}" for m, n in sorted(counts.items()))


def run(args: argparse.Namespace) -> None:
    """Load, search, print, write."""
    if args.topk < 1:
        raise SearchError(f"--topk must be at least 1, got {args.topk}")
    gallery = load_features(args.gallery)
    if args.query is not None:
        query = load_features(args.query)
        query_name, query_src = describe(query, ""), str(args.query)
    else:
        query = extract_queries(args.query_images, args.model, args.modality, args.camera, args.config,
                                args.dataset)
        query_name = f"the query images' features (model {args.model})"
        query_src = f"{len(query.items)} query images"
    result = search_features(query, gallery, args.topk, cross_modality=not args.all_modalities,
                             rerank=args.rerank, backend=args.backend, query_name=query_name,
                             max_rerank_items=args.rerank_limit)
    rows = result_rows(query, gallery, result)
    out = Path(args.out)
    header = {"gallery": str(args.gallery), "query": query_src, "model": gallery.model, "topk": args.topk,
              "score": result.score_kind, "backend": result.backend, "cross_modality": result.cross_modality,
              "rerank": args.rerank}
    js, cs = write_tables(out, rows, header)
    figures = [plot_rank_list(rec, out / f"ranklist_{rec['row']:04d}.png",
                              query.path.parent if query.path else None,
                              gallery.path.parent if gallery.path else None, result.score_kind)
               for rec in rows[:max(0, args.figures)]]

    mode = "other modality only" if result.cross_modality else "all modalities"
    print(f"gallery {args.gallery}: {len(gallery.items)} images ({modality_counts(gallery.items)}); "
          f"queries: {query_src}: {len(query.items)} ({modality_counts(query.items)})")
    how = "k-reciprocal re-ranking" if args.rerank else f"backend {result.backend}"
    print(f"top-{args.topk}, {mode}, {how}, score = "
          + ("cosine similarity" if result.score_kind == "cosine" else "minus the re-ranked distance")
          + " (higher = closer)")
    for rec in rows[:max(0, args.show)]:
        print()
        print(format_query(rec, result.score_kind))
    if len(rows) > args.show:
        print(f"\n... {len(rows) - max(0, args.show)} more queries in {cs}")
    print(f"\nwrote {js}, {cs}" + (f" and {len(figures)} rank-list figures ({figures[0].name} ...)" if figures else ""))


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 2 with a one-line message for any error (traceback with --debug)."""
    args = parse_args(argv)
    known = (SearchError, FeatureFileError, CheckpointError, DatasetChoiceError)
    return run_command(lambda: run(args), debug_requested(args.debug), known)


if __name__ == "__main__":
    sys.exit(main())
