"""Benchmark inference: model img/s (PyTorch eager vs onnxruntime) and gallery search (FAISS vs torch), side by side.

    python launch/bench_inference.py                                   # both sections, ViT-B, 10k/100k/1M
    python launch/bench_inference.py --sections model --model runs/x/model_best.pt --model-batch 32
    python launch/bench_inference.py --sections search --sizes 10000 100000 --dim 3840 --json bench.json

Model section: `mip_dist.inference.onnx_export.bench_onnx`: the evaluation forward (fp32, CPU) in eager
PyTorch and in onnxruntime on the same random batches, images per second of each and their ratio. --model
is an exported model file; without it the default config's model (ViT-B/16, the paper layout) with random
weights (speed does not depend on the weights), or a smaller one with --model-overrides (e.g.
model.depth=3). The graph is exported to a temporary folder first (about 35 s for ViT-B) and removed.

Search section: random L2-normalised float32 galleries (seeded, generated in chunks), one batch of --batch
queries, top-k. For each size and backend (`mip_dist.inference.search.build_index`, both exact):
index build time; latency per query in a batch of --batch queries and of one query alone (best of
--repeat, the backends' runs interleaved); index bytes (FAISS: its own copy of the rows; torch: the gallery tensor itself, shared with
the caller) and the process's resident memory (current RSS from /proc/self/statm) after building and
after a first batch search, minus the RSS before building this backend's index (the gallery is allocated
before either). Prints one table
and the torch/faiss ratios; --json writes every number.

D: ViT-B's 768 by default. The paper model's `extract` (JPM, 4 parts) returns 768 x (1 + 4) = 3840 values
per image; brute-force search cost and memory grow linearly in D (--dim 3840; 1M x 3840 float32 is 14.3 GiB,
twice that with the FAISS copy). Threads: torch's and FAISS's defaults (all cores), printed in the header.
torch and faiss-cpu each bring their own OpenMP runtime; their idle threads spin for a while after each
parallel region and compete for the cores, which costs FAISS most on single queries (short regions
alternating with torch's). OMP_WAIT_POLICY=PASSIVE (set before starting Python) stops the spinning; the
header prints its value and the load average (other processes on the machine skew every number).

Each benchmark is a `section_*(args) -> dict` function listed in SECTIONS; main() runs them in order and
puts each one's result under its name in the --json output.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from mip_dist.cli import debug_requested, report_error
from mip_dist.config import ConfigError, load_config
from mip_dist.engine.safe_load import CheckpointError
from mip_dist.inference.onnx_export import bench_onnx
from mip_dist.inference.search import build_index, faiss_available

_GEN_CHUNK = 1 << 16  # rows generated per step: the generator's temporaries stay small


def random_unit_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """[n, d] float32 L2-normalised rows, generated chunk by chunk from one seeded generator (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, d)
    for s in range(0, n, _GEN_CHUNK):
        chunk = out[s:s + _GEN_CHUNK]
        chunk.normal_(generator=g)
        chunk.div_(chunk.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return out


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """Best wall time of `repeat` calls, in seconds."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def build_measured(gallery: torch.Tensor, queries: torch.Tensor, backend: str, k: int) -> tuple[Any, dict]:
    """(index, row): build time, index bytes, and RSS added by building and by a first batch search."""
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = build_index(gallery, backend)
    build_s = time.perf_counter() - t0
    rss_built = rss_bytes() - rss0
    index.search(queries, k)  # warm-up (thread pools, first-touch pages, buffers)
    row = {"backend": backend, "rows": index.ntotal, "dim": index.dim, "build_s": build_s,
           "index_bytes": index.nbytes, "rss_after_build_bytes": rss_built,
           "rss_after_search_bytes": rss_bytes() - rss0}
    return index, row


def bench_size(gallery: torch.Tensor, queries: torch.Tensor, backends: list[str], k: int, repeat: int) -> list[dict]:
    """Every backend on one gallery; their timed searches interleave (order swapped each round) so that load
    from other processes hits both alike; best of `repeat` batches and of 3 x `repeat` single queries."""
    built = [build_measured(gallery, queries, b, k) for b in backends]
    batch = {b: float("inf") for b in backends}
    single = dict(batch)
    for r in range(max(1, repeat)):
        for index, row in (built if r % 2 == 0 else built[::-1]):
            b = row["backend"]
            batch[b] = min(batch[b], best_time(lambda: index.search(queries, k), 1))
            single[b] = min(single[b], best_time(lambda: index.search(queries[:1], k), 3))
    for _, row in built:
        row["batch_ms_per_query"] = 1e3 * batch[row["backend"]] / queries.shape[0]
        row["single_query_ms"] = 1e3 * single[row["backend"]]
    return [row for _, row in built]  # the indices are freed with this frame


def _mib(n: float) -> str:
    """Bytes as MiB, one decimal."""
    return f"{n / 2**20:,.1f}"


def section_search(args: argparse.Namespace) -> dict:
    """FAISS vs torch exact search over random galleries of each size: one table, then torch/faiss ratios."""
    backends = ["faiss", "torch"] if faiss_available() else ["torch"]
    if len(backends) == 1:
        print("faiss does not import: torch only (pip install faiss-cpu for the comparison)")
    queries = random_unit_rows(args.batch, args.dim, seed=args.seed + 1)
    rows = []
    head = (f"{'rows':>9} {'backend':>7} {'build s':>8} {'ms/query':>9} {'1-query ms':>10} {'index MiB':>10} "
            f"{'RSS build':>10} {'RSS search':>10}")
    print(f"\nsearch: D={args.dim}, top-{args.topk}, batch of {args.batch} queries; RSS = resident MiB added "
          "by building / after searching")
    print(head)
    print("-" * len(head))
    for n in args.sizes:
        t0 = time.perf_counter()
        gallery = random_unit_rows(n, args.dim, seed=args.seed)
        gen_s = time.perf_counter() - t0
        for r in bench_size(gallery, queries, backends, args.topk, args.repeat):
            r["generate_s"] = gen_s
            rows.append(r)
            backend = r["backend"]
            print(f"{n:>9,} {backend:>7} {r['build_s']:>8.3f} {r['batch_ms_per_query']:>9.3f} "
                  f"{r['single_query_ms']:>10.2f} {_mib(r['index_bytes']):>10} {_mib(r['rss_after_build_bytes']):>10} "
                  f"{_mib(r['rss_after_search_bytes']):>10}")
        del gallery
        gc.collect()
    ratios = []
    if len(backends) == 2:
        print("\ntorch / faiss (above 1: torch slower or larger)")
        print(f"{'rows':>9} {'build':>8} {'ms/query':>9} {'1-query':>8} {'RSS search':>10}")
        for n in args.sizes:
            f, t = (next(r for r in rows if r["rows"] == n and r["backend"] == b) for b in backends)
            ratio = {"rows": n, "build": t["build_s"] / max(f["build_s"], 1e-9),
                     "batch_ms_per_query": t["batch_ms_per_query"] / f["batch_ms_per_query"],
                     "single_query_ms": t["single_query_ms"] / f["single_query_ms"],
                     "rss_after_search": t["rss_after_search_bytes"] / max(f["rss_after_search_bytes"], 1)}
            ratios.append(ratio)
            print(f"{n:>9,} {ratio['build']:>8.3f} {ratio['batch_ms_per_query']:>9.2f} "
                  f"{ratio['single_query_ms']:>8.2f} {ratio['rss_after_search']:>10.2f}")
    return {"dim": args.dim, "topk": args.topk, "batch": args.batch, "results": rows, "torch_over_faiss": ratios}


BENCH_CLASSES, BENCH_CAMERAS = 395, 6  # SYSU-MM01's training identities and cameras (the classifier is not run)


def section_model(args: argparse.Namespace) -> dict:
    """Eager PyTorch vs onnxruntime images/s of the evaluation forward: one line each, then the ratio."""
    flip = None  # a model file: its config's eval.flip
    if args.model:
        model: Any = args.model
        what = args.model
    else:
        from mip_dist.model.mip import build_model

        cfg = load_config(None, args.model_overrides)
        torch.manual_seed(args.seed)
        model = build_model(cfg.model, cfg.attention, BENCH_CLASSES, BENCH_CAMERAS)
        flip = cfg.eval.flip
        what = f"default config{' + ' + ' '.join(args.model_overrides) if args.model_overrides else ''}, random weights"
    print(f"\nmodel: {what}; batch {args.model_batch}, {args.model_seconds:g} s per side")
    r = bench_onnx(model, batch_size=args.model_batch, seconds=args.model_seconds, threads=args.threads, flip=flip)
    print(f"{'runtime':>12} {'img/s':>9}   ({r['layout']} layout, {r['img_size']}, feature {r['feature_dim']}, "
          f"flip {r['flip']}, {r['threads']} threads, {r['exporter']} export in {r['export_s']:.1f} s)")
    print(f"{'eager':>12} {r['eager_img_s']:>9.2f}")
    print(f"{'onnxruntime':>12} {r['onnx_img_s']:>9.2f}")
    print(f"onnxruntime / eager: {r['onnx_over_eager']:.2f}x (above 1: onnxruntime faster)")
    return r


# The benchmark sections, run in this order. Add one by writing `section_<name>(args) -> dict` (its options in
# parse_args) and listing it here.
SECTIONS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "model": section_model,
    "search": section_search,
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line: which sections, and each section's options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                   help="benchmarks to run (default: all)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every number as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=None, metavar="PATH",
                       help="exported model file (default: the default config's model, random weights)")
    model.add_argument("--model-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                       help="config overrides for the default model, e.g. model.depth=3")
    model.add_argument("--model-batch", type=int, default=16, help="images per batch")
    model.add_argument("--model-seconds", type=float, default=10.0, help="timed seconds per runtime")
    model.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    search = p.add_argument_group("search")
    search.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="gallery sizes (rows)")
    search.add_argument("--dim", type=int, default=768, help="feature dimension (paper model with JPM: 3840)")
    search.add_argument("--batch", type=int, default=100, help="queries per batch")
    search.add_argument("--topk", type=int, default=10)
    search.add_argument("--repeat", type=int, default=4, help="timed rounds (best is reported)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the chosen sections, print their tables, write --json."""
    args = parse_args(argv)
    faiss_version = None
    if faiss_available():
        import faiss

        faiss_version = faiss.__version__
    header = {"torch": torch.__version__, "faiss": faiss_version, "torch_threads": torch.get_num_threads(),
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}
    header["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    header["load_average"] = os.getloadavg()[0]
    print(f"torch {header['torch']} ({header['torch_threads']} threads), faiss {faiss_version}, "
          f"{header['cpus']} CPUs ({header['machine']}), load average {header['load_average']:.2f}, "
          f"OMP_WAIT_POLICY={header['omp_wait_policy'] or 'unset'}")
    out: dict[str, Any] = {"environment": header}
    try:
        for name in args.sections:
            out[name] = SECTIONS[name](args)
    except Exception as exc:  # noqa: BLE001 - one line; --debug shows the traceback
        return report_error(exc, debug_requested(args.debug), known=(ConfigError, CheckpointError))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
