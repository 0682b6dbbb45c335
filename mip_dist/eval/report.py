"""Human-readable evaluation output shared by the trainer and launch/evaluate.py: table, results.json, plots."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .visualize import plot_cmc

TABLE_COLUMNS = ("R1", "R10", "R20", "mAP", "mINP")
LOSS_KEYS = ("loss", "id", "triplet", "msel", "iael")  # total first, then MIPLoss's named parts


def format_table(results: dict) -> str:
    """Setting | trials | R1 | R10 | R20 | mAP | mINP, each 'mean ± std' when there were several trials."""
    rows = []
    for name, res in results.items():
        if not isinstance(res, dict):
            continue
        cells = [f"{res[c]:6.2f} ± {res[c + '_std']:4.2f}" if res["trials"] > 1 else f"{res[c]:6.2f}"
                 for c in TABLE_COLUMNS]
        rows.append([name, str(res["trials"])] + cells)
    head = ["setting", "trials", *TABLE_COLUMNS]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(head), "-" * len(line(head))] + [line(r) for r in rows])


def write_results(results: dict, out_dir: str | Path, meta: dict[str, Any], title: str = "CMC") -> list[Path]:
    """results.json ({meta, results}) and cmc.png in out_dir; returns the written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return [path, plot_cmc(results, out / "cmc.png", title=title)]


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
