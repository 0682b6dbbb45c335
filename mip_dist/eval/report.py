"""Human-readable evaluation output shared by the trainer and launch/evaluate.py: table, results.json, plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .visualize import plot_cmc

TABLE_COLUMNS = ("R1", "R10", "R20", "mAP", "mINP")
LOSS_KEYS = ("loss", "id", "triplet", "msel", "iael")  # total first, then MIPLoss's named parts


AGGREGATE_KEYS = ("R1", "R5", "R10", "R20", "mAP", "mINP")


def _count(res: dict) -> int:
    """How many values a row's mean is over: splits for an aggregate row, else trials."""
    return int(res.get("splits", res["trials"]))


def format_table(results: dict) -> str:
    """Setting | trials (or splits) | R1 | R10 | R20 | mAP | mINP, 'mean ± std' when over several values."""
    rows = []
    for name, res in results.items():
        if not isinstance(res, dict):
            continue
        cells = [f"{res[c]:6.2f} ± {res[c + '_std']:4.2f}" if _count(res) > 1 else f"{res[c]:6.2f}"
                 for c in TABLE_COLUMNS]
        rows.append([name, str(_count(res))] + cells)
    per = "splits" if any(isinstance(r, dict) and "splits" in r for r in results.values()) else "trials"
    head = ["setting", per, *TABLE_COLUMNS]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(head), "-" * len(line(head))] + [line(r) for r in rows])


def splits_label(numbers: list[Optional[int]]) -> str:
    """'mean over splits 1-10 (n=10)' from the splits actually evaluated (RegDB numbers from index.json);
    'mean over models 1-3 (n=3)' when the test sets carry no split number."""
    n = len(numbers)
    if not numbers or any(x is None for x in numbers):
        return f"mean over models 1-{n} (n={n})" if n > 1 else "one model (n=1)"
    ints = sorted(int(x) for x in numbers)
    if len(set(ints)) == n and n > 1 and ints == list(range(ints[0], ints[0] + n)):
        return f"mean over splits {ints[0]}-{ints[-1]} (n={n})"
    word = "split" if n == 1 else "splits"
    return f"mean over {word} {', '.join(map(str, ints))} (n={n})"


def aggregate_splits(per_split: list[dict], label: Optional[str] = None) -> dict:
    """Mean and population std (ddof=0) over splits of each setting's per-split mean, as RegDB papers report.

    Each input is one model's `evaluate_features` result (itself a mean over its trials). Settings
    missing from any split are left out, so every aggregate is over the same splits. `label` (see
    `splits_label`) replaces one split's number in each description, so the mean never reads as one split.
    """
    if not per_split:
        raise ValueError("aggregate_splits: no split results given")
    names = [n for n, r in per_split[0].items() if isinstance(r, dict) and all(isinstance(s.get(n), dict)
                                                                               for s in per_split)]
    label = label or f"mean over {len(per_split)} splits (n={len(per_split)})"
    out: dict[str, Any] = {}
    for name in names:
        rows = [s[name] for s in per_split]
        agg: dict[str, Any] = {"splits": len(rows), "trials": rows[0]["trials"], "split_label": label,
                               "description": _aggregate_description(rows[0], label),
                               "headline": rows[0].get("headline", True), "per_split": {}}
        if all(r.get("split") is not None for r in rows):
            agg["split_numbers"] = [int(r["split"]) for r in rows]
        for key in AGGREGATE_KEYS:
            if all(key in r for r in rows):
                values = np.asarray([float(r[key]) for r in rows])
                agg[key], agg[f"{key}_std"] = float(values.mean()), float(values.std())
                agg["per_split"][key] = values.tolist()
        agg["cmc"] = np.mean([np.asarray(r["cmc"], dtype=np.float64) for r in rows], axis=0).tolist()
        out[name] = agg
    for name in names:
        for key in TABLE_COLUMNS:
            out[f"{name}/{key}"] = out[name][key]
    return out


def _aggregate_description(row: dict, label: str) -> str:
    """One split's setting description without its split number, followed by what the mean is over."""
    text = str(row.get("description", ""))
    if row.get("split") is not None:
        text = text.replace(f" (split {row['split']})", "")
    return f"{text}; {label}" if text else label


def results_filename(name: str = "") -> str:
    """results.json, or results_<name>.json for one named test set of a model (never another's file)."""
    return f"results_{name}.json" if name else "results.json"


def write_aggregate(per_split: list[dict], aggregate: dict, metas: list[dict], out_dir: str | Path,
                    name: str = "", label: str = "") -> Path:
    """results.json (results_<name>.json) with {"meta", "splits": [{"meta", "results"}...], "aggregate"} for
    a multi-split evaluation."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / results_filename(name)
    doc = {"meta": {"num_splits": len(per_split), "std": "population (ddof=0) over splits", "splits": label},
           "splits": [{"meta": m, "results": r} for m, r in zip(metas, per_split)], "aggregate": aggregate}
    path.write_text(json.dumps(doc, indent=2))
    return path


def write_results(results: dict, out_dir: str | Path, meta: dict[str, Any], title: str = "CMC",
                  name: str = "") -> list[Path]:
    """results.json ({meta, results}) and cmc.png in out_dir (results_<name>.json and cmc_<name>.png for a
    named test set, so evaluating a model's second dataset keeps the first's files); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / results_filename(name)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return [path, plot_cmc(results, out / (f"cmc_{name}.png" if name else "cmc.png"), title=title)]


def plot_loss_curve(metrics_jsonl: str | Path, path: str | Path) -> Path:
    """Total and per-part training losses against the step, read from a run's metrics.jsonl."""
    steps: list[int] = []
    series: dict[str, list[float]] = {}
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        losses = {k: v for k, v in rec.items() if k in LOSS_KEYS and isinstance(v, (int, float))}
        if "step" not in rec or not losses:
            continue
        steps.append(int(rec["step"]))
        for key, value in losses.items():
            series.setdefault(key, []).append(float(value))
    if not steps:
        raise ValueError(f"{metrics_jsonl}: no training loss records to plot")
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for key, values in series.items():
        if len(values) == len(steps):
            ax.plot(np.asarray(steps), np.asarray(values), label=key, linewidth=2 if key == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = Path(path)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
