"""Evaluate an exported MIP model on the standard VI-ReID protocols; print a table, write results.json and plots.

    python launch/evaluate.py --checkpoint runs/x/model_best.pt [--config C] [--protocol sysu sysu_authors]
                              [--out DIR] [--flip] [--visualize] [--device cpu] [key=value ...]

The checkpoint is the consolidated fp32 file the trainer exports ({"model", "config", "num_classes",
"num_cameras"}), read with `torch.load(weights_only=True)`. Without --config its embedded config is
used; with one, the model sections must agree. Under torchrun / deepspeed / accelerate (WORLD_SIZE > 1)
every rank extracts a share of the test set and rank 0 writes the outputs.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

from mip_dist.config import Config, ConfigError, from_dict, load_config, parse_override, to_dict
from mip_dist.data.shards import ShardError
from mip_dist.eval.protocols import PROTOCOL_NAMES, ProtocolError

# model settings that change neither parameter shapes nor test-time features
_TRAIN_ONLY_MODEL_KEYS = {"pretrained", "drop_rate", "attn_drop_rate", "drop_path", "prompt_dropout"}


class EvalError(RuntimeError):
    """A user-facing problem (missing file, mismatched checkpoint, bad protocol); printed without traceback."""


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line: options plus trailing key=value config overrides."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="exported model file (model_best.pt / model_final.pt)")
    p.add_argument("--config", default=None, help="YAML config; default: the config saved in the checkpoint")
    p.add_argument("--protocol", nargs="+", default=None, metavar="P",
                   help=f"protocols to run ({', '.join(PROTOCOL_NAMES)}); default: eval.protocols")
    p.add_argument("--out", default=None, help="output folder; default: <checkpoint folder>/eval")
    p.add_argument("--flip", action="store_true", help="average features with the horizontally flipped image")
    p.add_argument("--visualize", action="store_true", help="also write t-SNE and attention-overlay figures")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides such as eval.trials=3 data.shards=/path")
    return p.parse_args(argv)


EXPECTED = "expected an exported model such as model_final.pt / model_best.pt from the run folder"
# files DeepSpeed writes into a checkpoint tag (runs/<name>/checkpoints/stepNNNNNNNN/)
_DEEPSPEED_FILE = re.compile(r"^(bf16_)?(zero_pp_rank_\d+_)?mp_rank_\d+_(model|optim)_states\.pt$")


def _exported_beside(file: Path) -> str:
    """What to pass instead of a DeepSpeed tag file: the run's exported models that exist, else their names."""
    run = file.parent.parent.parent if file.parent.parent.name == "checkpoints" else file.parent
    found = [str(run / n) for n in ("model_final.pt", "model_best.pt") if (run / n).is_file()]
    return " or ".join(found) if found else "the run's model_final.pt / model_best.pt (written by the trainer)"


def load_checkpoint(path: str) -> dict:
    """The exported model file, read with weights_only=True and checked for the keys the trainer writes;
    anything else (a DeepSpeed tag file, a foreign pickle, garbage) is a one-line EvalError naming it."""
    from mip_dist.engine.checkpoint import CheckpointError, numpy_globals, safe_torch_load

    file = Path(path)
    if file.is_dir():
        raise EvalError(f"{file} is a folder; {EXPECTED}")
    if not file.is_file():
        raise EvalError(f"checkpoint not found: {file}")
    if _DEEPSPEED_FILE.match(file.name):
        raise EvalError(f"{file} is a DeepSpeed training checkpoint file, not an exported model; "
                        f"pass {_exported_beside(file)}")
    try:
        blob = safe_torch_load(file, map_location="cpu", allow=numpy_globals())  # numpy: to recognise DeepSpeed files
    except CheckpointError as exc:  # unpickling refused or not a torch.save file
        raise EvalError(f"{exc}; {EXPECTED}") from exc
    if not isinstance(blob, dict):
        raise EvalError(f"{file}: holds a {type(blob).__name__}, not an exported model dict; {EXPECTED}")
    if "module" in blob and "ds_version" in blob:
        raise EvalError(f"{file} is a DeepSpeed training checkpoint file, not an exported model; "
                        f"pass {_exported_beside(file)}")
    missing = {"model", "config", "num_classes", "num_cameras"} - set(blob)
    if missing:
        raise EvalError(f"{file}: not an exported mip-dist model (missing {', '.join(sorted(missing))}); "
                        "export one with the trainer (model_best.pt / model_final.pt)")
    return blob


def resolve_config(config_path: Optional[str], overrides: list[str], blob: dict, ckpt_path: str) -> Config:
    """The run config: --config (checked against the checkpoint's) or the checkpoint's own, plus overrides."""
    try:
        saved = from_dict(blob["config"])
    except ConfigError as exc:
        raise EvalError(f"{ckpt_path}: its saved config is not valid here: {exc}") from exc
    if config_path is None:
        data = to_dict(saved)
        for text in overrides:
            key, value = parse_override(text)
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node[leaf] = value
        cfg = from_dict(data)
    else:
        cfg = load_config(config_path, overrides)
    given, trained = to_dict(cfg)["model"], to_dict(saved)["model"]
    diff = [f"model.{k}: checkpoint {trained[k]!r}, config {given[k]!r}" for k in sorted(given)
            if k not in _TRAIN_ONLY_MODEL_KEYS and given.get(k) != trained.get(k)]
    if diff:
        raise EvalError(f"checkpoint {ckpt_path} was trained with another model config:\n  " + "\n  ".join(diff))
    return cfg


def build_and_load(cfg: Config, blob: dict, index: dict, ckpt_path: str) -> torch.nn.Module:
    """The model of `cfg` with the checkpoint's weights; identity/camera counts checked against index.json."""
    from mip_dist.model import build_model

    num_classes, num_cameras = int(blob["num_classes"]), int(blob["num_cameras"])
    for key, have in (("num_classes", num_classes), ("num_cameras", num_cameras)):
        if key in index and int(index[key]) != have:
            raise EvalError(f"checkpoint {ckpt_path} has {key}={have} but the shards' index.json says "
                            f"{index[key]}: the checkpoint was trained on another dataset or split")
    model = build_model(cfg.model, cfg.attention, num_classes, num_cameras)
    try:
        model.load_state_dict(blob["model"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[:6]
        raise EvalError(f"checkpoint {ckpt_path} does not fit the model of this config:\n  " + "\n  ".join(first)) from exc
    return model


def _init_process_group(device_pref: str, local_rank: int) -> tuple[int, int, torch.device]:
    """(rank, world, device): a process group only when a launcher started several ranks."""
    from mip_dist.engine.distributed import init_distributed, resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        env = init_distributed(device_pref, local_rank)
        return env.rank, env.world_size, env.device
    return 0, 1, resolve_device(device_pref, max(local_rank, 0))


def visualize(model: torch.nn.Module, cfg: Config, index: dict, feats: torch.Tensor, keys: list[str],
              out: Path, device: torch.device) -> list[Path]:
    """t-SNE of instance prompts and CLS-attention overlays for rank-1 pairs of the first setting."""
    from mip_dist.data.stream import build_test_loader
    from mip_dist.eval import visualize as vis
    from mip_dist.eval.metrics import pairwise_distance
    from mip_dist.eval.protocols import build_settings

    written = []
    loader = build_test_loader(cfg.data, rank=0, world_size=1, batch_size=cfg.eval.batch_size)
    emb = vis.instance_prompt_embedding(model, loader, device=device)
    if emb is not None:
        written.append(vis.plot_tsne(emb["embedding"], emb["pid"], emb["modality"], out / "tsne_instance_prompts.png"))
    setting = build_settings(index, cfg.eval.protocols, trials=1)[0]
    row = {k: i for i, k in enumerate(keys)}
    recs = index["test_records"]
    q_rows = [row[recs[i]["key"]] for i in setting.query]
    g_rows = [row[recs[i]["key"]] for i in setting.galleries[0]]
    distmat = pairwise_distance(feats[q_rows], feats[g_rows])
    pairs = vis.select_pairs(distmat, [recs[i]["pid"] for i in setting.query],
                             [recs[i]["pid"] for i in setting.galleries[0]], k=4)
    wanted = {recs[setting.query[q]]["key"]: None for q, _, _ in pairs}
    wanted.update({recs[setting.galleries[0][g]]["key"]: None for _, g, _ in pairs})
    images = vis.collect_images(build_test_loader(cfg.data, rank=0, world_size=1, batch_size=cfg.eval.batch_size),
                                wanted)
    triples = [(images[recs[setting.query[q]]["key"]], images[recs[setting.galleries[0][g]]["key"]], ok)
               for q, g, ok in pairs]
    written.append(vis.plot_attention_pairs(model, triples, out / f"attention_{setting.name}.png", device=device))
    return written


def run(args: argparse.Namespace) -> dict:
    """Everything after argument parsing; raises EvalError / ConfigError / ProtocolError for user mistakes."""
    from mip_dist.engine.evaluator import default_dtype, evaluate_features, extract_features
    from mip_dist.eval.report import format_table, write_results

    blob = load_checkpoint(args.checkpoint)
    cfg = resolve_config(args.config, args.overrides, blob, args.checkpoint)
    if args.flip:
        cfg.eval.flip = True
    protocols = args.protocol or cfg.eval.protocols
    unknown = [p for p in protocols if p not in PROTOCOL_NAMES]
    if unknown:
        raise EvalError(f"unknown protocol(s) {unknown}; choose from {', '.join(PROTOCOL_NAMES)}")
    cfg.eval.protocols = list(protocols)
    index_path = Path(cfg.data.shards) / "index.json"
    if not index_path.is_file():
        raise EvalError(f"data.shards: no index.json at {index_path} (write the test shards first, or pass "
                        "data.shards=/path/to/shards)")
    from mip_dist.data.stream import build_test_loader, read_index

    index = read_index(cfg.data.shards)
    rank, world, device = _init_process_group(args.device, args.local_rank)
    model = build_and_load(cfg, blob, index, args.checkpoint).to(device).eval()

    t0 = time.perf_counter()
    loader = build_test_loader(cfg.data, rank=rank, world_size=world, batch_size=cfg.eval.batch_size)
    feats, keys = extract_features(model, loader, device=device, flip=cfg.eval.flip, dtype=default_dtype(device),
                                   distributed=world > 1)
    results = evaluate_features(feats, keys, index, cfg.eval.protocols, trials=cfg.eval.trials,
                                max_rank=cfg.eval.max_rank, rerank=cfg.eval.rerank, device=device)
    if rank != 0:
        return results
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / "eval"
    out.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(Path(args.checkpoint).resolve()), "config": args.config, "dataset": index.get("dataset"),
            "regdb_split": index.get("regdb_split"), "protocols": cfg.eval.protocols, "flip": cfg.eval.flip,
            "rerank": cfg.eval.rerank, "device": str(device), "world_size": world, "num_test_images": len(keys),
            "seconds": round(time.perf_counter() - t0, 2)}
    print(format_table(results))
    written = write_results(results, out, meta, title=f"CMC - {index.get('dataset')}")
    if args.visualize:
        written += visualize(model, cfg, index, feats, keys, out, device)
    print("\n".join(f"wrote {p}" for p in written))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 2 with a one-line message for user errors."""
    args = parse_args(argv)
    try:
        run(args)
    except (EvalError, ConfigError, ProtocolError, ShardError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
