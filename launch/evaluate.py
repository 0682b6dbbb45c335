"""Evaluate an exported MIP model on the standard VI-ReID protocols; print a table, write results.json and plots.

    python launch/evaluate.py --checkpoint runs/x/model_best.pt [--config C] [--protocol sysu sysu_authors]
                              [--out DIR] [--flip] [--visualize] [--device cpu] [--debug] [key=value ...]
    # RegDB / LLCM style: one model per split, mean ± std over the splits
    python launch/evaluate.py --checkpoint runs/regdb1/model_best.pt --shards shards/regdb1 \
                              --checkpoint runs/regdb2/model_best.pt --shards shards/regdb2 ... --out eval_regdb
    python launch/evaluate.py --runs 'runs/regdb*' --out eval_regdb

The checkpoint is the consolidated fp32 file the trainer exports ({"model", "config", "num_classes",
"num_cameras"}), read with `torch.load(weights_only=True)`. Without --config its embedded config is
used; with one, the model sections must agree. Under torchrun / deepspeed / accelerate (WORLD_SIZE > 1)
every rank extracts a share of the test set and rank 0 writes the outputs.

Every pair is checked (checkpoint readable, config, index.json, protocols vs the shards' dataset, RegDB
split of the checkpoint vs the shards) before any feature is extracted. Errors: one `error:` line naming
the file, key or value and exit code 2; the traceback only with --debug or MIP_DEBUG=1. key=value
overrides may follow --protocol's names. Progress (a bar on a terminal, else a line every 10 s, and a
line per protocol setting) goes to stderr. One dataset of a multi-dataset model (--dataset NAME), or a
--cross-dataset test set (named by its shard folder), writes results_<name>.json, cmc_<name>.png and
figures named with <name>, so evaluating another dataset into the same folder keeps this one's files.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch

from mip_dist.cli import debug_requested, run_command
from mip_dist.config import Config, ConfigError, from_dict, load_config, to_dict
from mip_dist.data.shards import ShardError
from mip_dist.engine.export import load_exported
from mip_dist.engine.run_checks import protocol_misfit
from mip_dist.engine.safe_load import CheckpointError
from mip_dist.eval.protocols import PROTOCOL_NAMES, ProtocolError

# model settings that change neither parameter shapes nor test-time features
_TRAIN_ONLY_MODEL_KEYS = {"pretrained", "drop_rate", "attn_drop_rate", "drop_path", "prompt_dropout"}


class EvalError(RuntimeError):
    """A user-facing problem (missing file, mismatched checkpoint, bad protocol); printed without traceback."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line: options plus trailing key=value config overrides."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", action="append", default=[],
                   help="exported model file (model_best.pt / model_final.pt); repeat for one model per split")
    p.add_argument("--shards", action="append", default=[],
                   help="test shards of the --checkpoint at the same position (default: its data.shards)")
    p.add_argument("--runs", default=None, metavar="GLOB",
                   help="run folders (a glob such as 'runs/regdb*'); each contributes its model_best.pt "
                        "(else model_final.pt) with the shards of its saved config")
    p.add_argument("--config", default=None, help="YAML config; default: the config saved in the checkpoint")
    p.add_argument("--protocol", nargs="+", default=None, metavar="P",
                   help=f"protocols to run ({', '.join(PROTOCOL_NAMES)}); default: eval.protocols")
    p.add_argument("--out", default=None, help="output folder; default: <checkpoint folder>/eval")
    p.add_argument("--flip", action="store_true", help="average features with the horizontally flipped image")
    p.add_argument("--visualize", action="store_true",
                   help="also write rank lists (query + top-10, green = same id), the worst-AP queries, "
                        "t-SNE and attention-overlay figures")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="a model trained on several datasets (data.shards a list): evaluate on this one's test "
                        "shards (default: its folder; --shards overrides), with its cameras")
    p.add_argument("--cross-dataset", action="store_true",
                   help="test shards of another dataset than the model's: identity counts may differ (the "
                        "classifier is not used for retrieval); cameras must fit the model's camera table")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--release", action="store_true",
                   help="checkpoints saved by the MIP authors' code (detected automatically otherwise)")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides such as eval.trials=3 data.shards=/path")
    args = p.parse_intermixed_args(argv)
    return split_protocol_overrides(args, sys.argv[1:] if argv is None else argv, p)


def split_protocol_overrides(args: argparse.Namespace, argv: list[str], parser: argparse.ArgumentParser
                             ) -> argparse.Namespace:
    """`--protocol sysu data.shards=X` reads X as an override: --protocol takes several values and would
    otherwise swallow every key=value after it. Overrides keep their command-line order."""
    if args.protocol is None:
        return args
    moved = [p for p in args.protocol if "=" in p]
    args.protocol = [p for p in args.protocol if "=" not in p]
    if not args.protocol:
        parser.error("--protocol: give at least one protocol name before the key=value overrides "
                     f"(choose from {', '.join(PROTOCOL_NAMES)})")
    if moved:
        position = {a: i for i, a in reversed(list(enumerate(argv)))}
        args.overrides = sorted(moved + list(args.overrides), key=lambda a: position.get(a, len(argv)))
    return args


def resolve_config(config_path: Optional[str], overrides: list[str], blob: dict, ckpt_path: str) -> Config:
    """The run config: --config (checked against the checkpoint's) or the checkpoint's own, plus overrides."""
    try:
        saved = from_dict(blob["config"])
    except ConfigError as exc:
        raise EvalError(f"{ckpt_path}: its saved config is not valid here: {exc}") from exc
    cfg = load_config(config_path, overrides) if config_path else from_dict(blob["config"], overrides)
    given, trained = to_dict(cfg)["model"], to_dict(saved)["model"]
    diff = [f"model.{k}: checkpoint {trained[k]!r}, config {given[k]!r}" for k in sorted(given)
            if k not in _TRAIN_ONLY_MODEL_KEYS and given.get(k) != trained.get(k)]
    if diff:
        raise EvalError(f"checkpoint {ckpt_path} was trained with another model config: " + "; ".join(diff))
    return cfg


def check_counts(blob: dict, index: dict, ckpt_path: str, camera_offset: int = 0, cross_dataset: bool = False) -> None:
    """The test shards fit the model: the same identity and camera counts as it was trained with, or with
    --cross-dataset / --dataset only cameras that exist in its camera table."""
    num_classes, num_cameras = int(blob["num_classes"]), int(blob["num_cameras"])
    if cross_dataset or camera_offset or blob.get("datasets"):
        if "num_cameras" in index and camera_offset + int(index["num_cameras"]) > num_cameras:
            raise EvalError(f"checkpoint {ckpt_path} has a camera table of {num_cameras} cameras, but the test shards "
                            f"use {index['num_cameras']} cameras from position {camera_offset + 1}: the model has "
                            "no camera embedding for some of them")
        return
    for key, have in (("num_classes", num_classes), ("num_cameras", num_cameras)):
        if key in index and int(index[key]) != have:
            raise EvalError(f"checkpoint {ckpt_path} has {key}={have} but the shards' index.json says "
                            f"{index[key]}: the checkpoint was trained on another dataset or split (pass "
                            "--cross-dataset to evaluate it on another dataset on purpose)")


def build_and_load(cfg: Config, blob: dict, index: dict, ckpt_path: str, camera_offset: int = 0,
                   cross_dataset: bool = False) -> torch.nn.Module:
    """The model of `cfg` with the checkpoint's weights; identity/camera counts checked against index.json."""
    from mip_dist.model import build_model

    check_counts(blob, index, ckpt_path, camera_offset, cross_dataset)
    num_classes, num_cameras = int(blob["num_classes"]), int(blob["num_cameras"])
    model = build_model(cfg.model, cfg.attention, num_classes, num_cameras)
    try:
        model.load_state_dict(blob["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:6]
        raise EvalError(f"checkpoint {ckpt_path} does not fit the model of this config: "
                        + " ".join(line.strip() for line in first)) from exc
    return model


def _init_process_group(device_pref: str, local_rank: int) -> tuple[int, int, torch.device]:
    """(rank, world, device): a process group only when a launcher started several ranks."""
    from mip_dist.engine.distributed import init_distributed, resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        env = init_distributed(device_pref, local_rank)
        return env.rank, env.world_size, env.device
    return 0, 1, resolve_device(device_pref, max(local_rank, 0))


def check_trained_split(blob: dict, index: dict, ckpt_path: str, shards: str) -> None:
    """A RegDB model is only scored on its own split: half of another split's test ids were its training ids."""
    if index.get("dataset") != "regdb":
        return
    try:
        trained = from_dict(blob["config"]).data
    except ConfigError as exc:
        raise EvalError(f"{ckpt_path}: its saved config is not valid here: {exc}") from exc
    if trained.dataset != "regdb":
        return  # cross-dataset evaluation: the identity-count check in build_and_load still applies
    held = index.get("regdb_split")
    if held != trained.regdb_split:
        raise EvalError(f"checkpoint {ckpt_path} was trained on RegDB split {trained.regdb_split} (data.regdb_split "
                        f"in its saved config), but {Path(shards) / 'index.json'} holds split {held} (regdb_split); "
                        f"half of split {held}'s test identities may be training identities of split "
                        f"{trained.regdb_split}: pass the split-{trained.regdb_split} shards "
                        f"(launch/make_shards.py --dataset regdb --regdb-split {trained.regdb_split})")


class Job(NamedTuple):
    """One model to evaluate with its config and test index, all checked before any feature is extracted."""

    checkpoint: str
    blob: dict
    cfg: Config
    index: dict
    camera_offset: int = 0  # where the test shards' cameras start in the model's camera table
    name: str = ""  # names this test set's output files (results_<name>.json); "" for the model's own

    @property
    def split(self) -> Optional[int]:
        """The RegDB split the test shards hold (index.json), None for other datasets."""
        held = self.index.get("regdb_split") if self.index.get("dataset") == "regdb" else None
        return int(held) if held is not None else None


def trained_dataset(blob: dict, name: Optional[str], ckpt_path: str) -> tuple[Optional[str], int, Optional[str]]:
    """(shard folder, camera offset, protocol) of dataset `name` in a model trained on several datasets;
    (None, 0, None) for a model trained on one. Names the choices when `name` is missing or unknown."""
    from mip_dist.engine.export import DatasetChoiceError, trained_dataset_entry

    try:
        chosen = trained_dataset_entry(blob, name, ckpt_path)
    except DatasetChoiceError as exc:
        raise EvalError(str(exc)) from exc
    if chosen is None:
        return None, 0, None
    return chosen["path"], int(chosen["camera_offset"]), chosen["protocol"]


def model_pairs(args: argparse.Namespace) -> list[tuple[str, Optional[str]]]:
    """(checkpoint, shards or None) pairs from --checkpoint/--shards or --runs, validated for count and existence."""
    if args.runs and (args.checkpoint or args.shards):
        raise EvalError("pass either --runs GLOB (each run's shards come from its saved config) or "
                        "--checkpoint FILE(s) with optional --shards, not both")
    if args.shards and len(args.shards) != len(args.checkpoint):
        raise EvalError(f"{len(args.checkpoint)} --checkpoint but {len(args.shards)} --shards: give one --shards per "
                        "--checkpoint, in the same order, or none (each checkpoint's own data.shards)")
    if args.runs:
        folders = sorted(p for p in glob.glob(args.runs) if Path(p).is_dir())
        if not folders:
            raise EvalError(f"--runs {args.runs!r}: no run folder matches")
        pairs: list[tuple[str, Optional[str]]] = []
        for folder in folders:
            found = [Path(folder) / n for n in ("model_best.pt", "model_final.pt") if (Path(folder) / n).is_file()]
            if not found:
                raise EvalError(f"--runs: run folder {folder} has no model_best.pt or model_final.pt")
            pairs.append((str(found[0]), None))
        return pairs
    if not args.checkpoint:
        raise EvalError("no model to evaluate: pass --checkpoint FILE (repeat it for several splits) or --runs GLOB")
    return [(c, args.shards[i] if args.shards else None) for i, c in enumerate(args.checkpoint)]


def prepare(args: argparse.Namespace, ckpt: str, shards: Optional[str]) -> Job:
    """Checkpoint, config, protocols, index.json and RegDB split of one model; raises naming what is wrong."""
    from mip_dist.data.stream import read_index

    from mip_dist.model.release import ReleaseCheckpointError, is_release_checkpoint, release_blob

    try:  # the MIP authors' released checkpoints are read through the release layout
        blob = (release_blob(ckpt, base=load_config(args.config) if args.config else None)
                if args.release or is_release_checkpoint(ckpt) else load_exported(ckpt))
    except ReleaseCheckpointError as exc:
        raise EvalError(str(exc)) from exc
    folder, camera_offset, own_protocol = trained_dataset(blob, args.dataset, ckpt)
    shards = shards or folder
    overrides = list(args.overrides) + ([f"data.shards={shards}"] if shards else [])
    cfg = resolve_config(args.config, overrides, blob, ckpt)
    if cfg.data.multi_dataset:
        raise EvalError("data.shards: evaluation reads one test set; pass --dataset NAME or --shards FOLDER")
    if args.flip:
        cfg.eval.flip = True
    protocols = args.protocol or ([own_protocol] if own_protocol else cfg.eval.protocols)
    unknown = [p for p in protocols if p not in PROTOCOL_NAMES]
    if unknown:
        raise EvalError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOL_NAMES)}")
    cfg.eval.protocols = list(protocols)
    index_path = Path(cfg.data.shards) / "index.json"
    if not index_path.is_file():
        raise EvalError(f"data.shards: no index.json at {index_path} (write the test shards first, or pass "
                        "data.shards=/path/to/shards or --shards)")
    index = read_index(cfg.data.shards)
    check_protocols(protocols, index, cfg.data.shards, "--protocol" if args.protocol else
                    "data.shards protocol" if own_protocol else f"eval.protocols (saved in {ckpt})")
    if cfg.data.dataset == "auto":
        cfg.data.dataset = str(index.get("dataset"))
    check_trained_split(blob, index, ckpt, cfg.data.shards)
    name = args.dataset or (Path(cfg.data.shards).name if args.cross_dataset else "")
    return Job(ckpt, blob, cfg, index, camera_offset, name)


def check_protocols(protocols: list[str], index: dict, shards: str, source: str) -> None:
    """Every protocol fits the test shards' dataset (index.json), checked before the model is built."""
    misfit = protocol_misfit(list(protocols), str(index.get("dataset")))
    if misfit:
        raise EvalError(f"{source}: {misfit} ({shards}); pass --protocol with one of those")


def visualize(model: torch.nn.Module, cfg: Config, index: dict, feats: torch.Tensor, keys: list[str],
              out: Path, device: torch.device, name: str = "") -> list[Path]:
    """Rank lists and worst-AP queries of every setting (one figure each, named after it), t-SNE of instance
    prompts, CLS-attention pairs; file names carry `name` for a named test set."""
    from mip_dist.data.stream import build_test_loader
    from mip_dist.eval import visualize as vis
    from mip_dist.eval.metrics import pairwise_distance
    from mip_dist.eval.protocols import build_settings

    def loader():
        """A fresh single-process pass over the test shards (each figure reads what it needs)."""
        return build_test_loader(cfg.data, rank=0, world_size=1, batch_size=cfg.eval.batch_size)

    prefix = f"{name}_" if name else ""
    row = {k: i for i, k in enumerate(keys)}
    recs = index["test_records"]
    settings = build_settings(index, cfg.eval.protocols, trials=1)
    lists = {s.name: vis.rank_lists(feats, row, recs, s, num_queries=8) for s in settings}
    wanted = {k for rl in lists.values() for k in vis.keys_in(rl)}
    images = vis.collect_images(loader(), wanted)
    written = vis.rank_list_figures(lists, images, settings, recs, out, prefix=prefix)
    emb = vis.instance_prompt_embedding(model, loader(), device=device)
    if emb is not None:
        written.append(vis.plot_tsne(emb["embedding"], emb["pid"], emb["modality"],
                                     out / f"tsne_instance_prompts{'_' + name if name else ''}.png"))
    setting = next(s for s in settings if s.headline)
    query, gallery = setting.trial_query(0), setting.galleries[0]
    q_rows = [row[recs[i]["key"]] for i in query]
    g_rows = [row[recs[i]["key"]] for i in gallery]
    distmat = pairwise_distance(feats[q_rows], feats[g_rows])
    pairs = vis.select_pairs(distmat, [recs[i]["pid"] for i in query], [recs[i]["pid"] for i in gallery], k=4)
    wanted = {recs[query[q]]["key"]: None for q, _, _ in pairs}
    wanted.update({recs[gallery[g]]["key"]: None for _, g, _ in pairs})
    images = vis.collect_images(loader(), wanted)
    triples = [(images[recs[query[q]]["key"]], images[recs[gallery[g]]["key"]], ok) for q, g, ok in pairs]
    written.append(vis.plot_attention_pairs(model, triples, out / f"attention_{prefix}{setting.name}.png",
                                            device=device))
    return written


def evaluate_job(job: Job, args: argparse.Namespace, out: Path, world: tuple[int, int, torch.device]) -> dict:
    """Extract features once, run every setting, and (rank 0) print the table and write results.json
    (results_<name>.json for a named test set) and figures."""
    from mip_dist.data.stream import build_test_loader
    from mip_dist.engine.evaluator import default_dtype, evaluate_features, extract_features
    from mip_dist.eval.report import format_table, write_results

    rank, world_size, device = world
    cfg, index = job.cfg, job.index
    model = build_and_load(cfg, job.blob, index, job.checkpoint, job.camera_offset,
                           args.cross_dataset).to(device).eval()
    images = len(index.get("test_records") or [])
    if rank == 0:
        print(f"evaluating {job.checkpoint} on {cfg.data.shards} ({index.get('dataset')}, {images} test images, "
              f"protocols {', '.join(cfg.eval.protocols)}) on {device}, {world_size} rank(s)", flush=True)
    t0 = time.perf_counter()
    loader = build_test_loader(cfg.data, rank=rank, world_size=world_size, batch_size=cfg.eval.batch_size)
    feats, keys = extract_features(model, loader, device=device, flip=cfg.eval.flip, dtype=default_dtype(device),
                                   distributed=world_size > 1, camera_offset=job.camera_offset,
                                   total=-(-images // world_size))
    results = evaluate_features(feats, keys, index, cfg.eval.protocols, trials=cfg.eval.trials,
                                max_rank=cfg.eval.max_rank, rerank=cfg.eval.rerank, device=device)
    if rank != 0:
        return results
    meta = split_meta(job, args, device, world_size, len(keys), time.perf_counter() - t0)
    print(format_table(results))
    title = f"CMC - {job.name or index.get('dataset')}"
    written = write_results(results, out, meta, title=title, name=job.name)
    if args.visualize:
        print("drawing figures (--visualize)", flush=True)
        written += visualize(model, cfg, index, feats, keys, out, device, job.name)
    print("\n".join(f"wrote {p}" for p in written))
    return results


def pair_meta(job: Job, args: argparse.Namespace) -> dict:
    """What identifies one evaluated model and its test data, so a number can be traced to its inputs."""
    index, cfg = job.index, job.cfg
    return {"checkpoint": str(Path(job.checkpoint).resolve()), "config": args.config, "shards": str(cfg.data.shards),
            "dataset": index.get("dataset"), "regdb_split": index.get("regdb_split"), "protocols": cfg.eval.protocols,
            "flip": cfg.eval.flip, "rerank": cfg.eval.rerank, "distance_dtype": "float64"}


def split_meta(job: Job, args: argparse.Namespace, device: torch.device, world_size: int, num_images: int,
               seconds: float) -> dict:
    """pair_meta plus how this run went (device, ranks, images, time): the meta of one results.json."""
    return {**pair_meta(job, args), "device": str(device), "world_size": world_size, "num_test_images": num_images,
            "seconds": round(seconds, 2)}


def _default_out(checkpoints: list[str]) -> Path:
    """<checkpoint folder>/eval for one model; <common parent of the run folders>/eval_splits for several."""
    if len(checkpoints) == 1:
        return Path(checkpoints[0]).resolve().parent / "eval"
    return Path(os.path.commonpath([str(Path(c).resolve().parent) for c in checkpoints])) / "eval_splits"


def split_folders(out: Path, jobs: list[Job]) -> list[Path]:
    """Where each model writes its own results: splitNN_<run folder>, NN the RegDB split its test shards hold
    (index.json; the position in the list for other datasets), made unique if two share a name."""
    folders: list[Path] = []
    for position, job in enumerate(jobs, 1):
        number = job.split if job.split is not None else position
        folder = out / f"split{number:02d}_{Path(job.checkpoint).resolve().parent.name}"
        folders.append(folder.with_name(f"{folder.name}_{position}") if folder in folders else folder)
    return folders


def run(args: argparse.Namespace) -> dict:
    """Everything after argument parsing; raises EvalError / ConfigError / ProtocolError for user mistakes."""
    from mip_dist.eval.report import aggregate_splits, format_table, results_filename, splits_label, write_aggregate

    jobs = [prepare(args, ckpt, shards) for ckpt, shards in model_pairs(args)]  # every check before extraction
    rank, world_size, device = _init_process_group(args.device, args.local_rank)
    out = Path(args.out) if args.out else _default_out([j.checkpoint for j in jobs])
    if len(jobs) == 1:
        return evaluate_job(jobs[0], args, out, (rank, world_size, device))
    if all(j.split is not None for j in jobs):
        jobs.sort(key=lambda j: j.split)  # split 2 before split 10, whatever the glob's order
    folders = split_folders(out, jobs)
    label = splits_label([j.split for j in jobs])
    per_split = []
    for i, (job, folder) in enumerate(zip(jobs, folders), 1):
        if rank == 0:
            which = f"split {job.split}" if job.split is not None else f"model {i}"
            print(f"== {which} ({i}/{len(jobs)}): {job.checkpoint} on {job.cfg.data.shards}", flush=True)
        per_split.append(evaluate_job(job, args, folder, (rank, world_size, device)))
    aggregate = aggregate_splits(per_split, label)
    if rank == 0:
        print(f"== {label.replace('mean over', 'mean ± std over', 1)}")
        print(format_table(aggregate))
        metas = [dict(pair_meta(j, args), results=str(f / results_filename(j.name))) for j, f in zip(jobs, folders)]
        print(f"wrote {write_aggregate(per_split, aggregate, metas, out, name=jobs[0].name, label=label)}")
    return aggregate


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 2 with a one-line message for any error (traceback with --debug)."""
    args = parse_args(argv)
    known = (EvalError, CheckpointError, ConfigError, ProtocolError, ShardError)
    try:
        return run_command(lambda: run(args), debug_requested(args.debug), known,
                           lines=int(os.environ.get("RANK", "0")) == 0)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
