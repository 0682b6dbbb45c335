"""Extract retrieval features of images with a trained model into a feature file (safetensors + JSON sidecar).

    python launch/extract.py photos/ --modality visible --model runs/x/model_best.pt --out gallery.safetensors
    python launch/extract.py queries.txt --model runs/x/model_best.pt --out queries.safetensors
    python launch/extract.py shards/sysu --model runs/x/model_best.pt --out sysu_test.safetensors

INPUT is any mix of:
  * a folder: every image in it and below (extensions jpg jpeg png bmp webp tif tiff gif), sorted by path;
  * an image file;
  * a list file (.txt): one image per line, `PATH [MODALITY [CAMERA [PID]]]` separated by whitespace
    (MODALITY visible|infrared, CAMERA the dataset's 1-based camera number, PID an integer identity; `-`
    leaves a column empty); relative paths are read from the list file's folder; blank lines and lines
    starting with # are skipped; a line that names an existing file as a whole is one path (spaces allowed);
  * a test-shard folder (holds index.json): every test image of its shards, with the shards' own modality,
    camera and identity, exactly as launch/evaluate.py reads them (items are named by their dataset-relative
    path and their shard key).
--modality / --camera apply to the images that carry none (folders, image files, list lines without that
column); images of folders and plain files need --modality. Without a camera, the model's first camera
(1) feeds its camera embedding and the sidecar records camera null.

Features are computed as evaluation computes them (same decoding, resize, flip averaging per the model's
eval.flip, bf16 on a GPU). Unreadable images are skipped, named in a warning and in the sidecar's "skipped".
A re-run with the same inputs (paths, sizes, mtimes), model (sha256) and settings reuses the output and
says "up to date"; --force recomputes. Errors: one `error:` line, exit 2 (traceback with --debug or MIP_DEBUG=1).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch

from mip_dist.cli import debug_requested, run_command
from mip_dist.config import ConfigError
from mip_dist.data.shard_index import ShardError
from mip_dist.data.transforms import IMAGE_EXTS
from mip_dist.engine.safe_load import CheckpointError
from mip_dist.inference.feature_file import FeatureFileError, load_features, save_features

log = logging.getLogger("mip_dist.extract")
LIST_SUFFIX = ".txt"
OUT_SUFFIX = ".safetensors"
PROGRESS_EVERY_S = 10.0  # a log line this often where no progress bar can be drawn
MAX_NAMED_SKIPS = 5  # unreadable images named in the warning (all of them are in the sidecar)


class ExtractError(ValueError):
    """A user-facing problem (bad input, missing flag); printed as one line without a traceback."""


class Entry(NamedTuple):
    """One image file to extract, with what is known about it (None: not given)."""

    path: Path
    modality: Optional[str] = None
    camera: Optional[int] = None
    pid: Optional[int] = None


class Inputs(NamedTuple):
    """Everything INPUT... names: image files, test-shard folders, and (path, size, mtime) of what was read."""

    files: list[Entry]
    shard_folders: list[Path]
    stamps: list[tuple[str, int, int]]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command line; --model and --out are checked by `check_args` (one error line, not argparse's usage)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="folder, image, list file (.txt) or test-shard folder")
    p.add_argument("--model", default=None, help="exported model (model_best.pt / model_final.pt) or the MIP "
                                                 "authors' checkpoint")
    p.add_argument("--config", default=None, help="with the authors' checkpoint: a config file giving what its "
                                                 "tensors cannot tell (e.g. configs/mip_vitb16_sysu_release.yaml)")
    p.add_argument("--dataset", default=None, help="a model trained on several datasets: the one the images come "
                                                  "from (its cameras' place in the model's camera table)")
    p.add_argument("--out", default=None, help="feature file to write (FEATS.safetensors; FEATS.json beside it)")
    p.add_argument("--modality", default=None, help="visible | infrared: the modality of images that carry none")
    p.add_argument("--camera", type=int, default=None, help="the dataset's 1-based camera number of images that "
                                                            "carry none (default: none; camera 1 feeds SIE)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default: bf16 on a GPU, fp32 on the CPU (as evaluation)")
    p.add_argument("--flip", default=None, action=argparse.BooleanOptionalAction,
                   help="average with the horizontally flipped image (default: the model's eval.flip)")
    p.add_argument("--force", action="store_true", help="recompute even when the output is up to date")
    p.add_argument("--debug", action="store_true", help="print the traceback of an error (also MIP_DEBUG=1)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """The flags every run needs, checked before any file is read."""
    if not args.inputs:
        raise ExtractError("no INPUT: pass image folders, image files, list files (.txt) or test-shard folders")
    if not args.model:
        raise ExtractError("--model is required: the exported model file (e.g. runs/<name>/model_best.pt)")
    if not args.out:
        raise ExtractError(f"--out is required: the feature file to write (e.g. gallery{OUT_SUFFIX})")
    if not args.out.endswith(OUT_SUFFIX):
        raise ExtractError(f"--out {args.out}: name the feature file FEATS{OUT_SUFFIX} (its sidecar is FEATS.json)")
    if args.modality is not None:
        try:
            args.modality = _modality(args.modality)
        except ValueError as exc:
            raise ExtractError(f"--modality: {exc}") from None
    if args.camera is not None and args.camera < 1:
        raise ExtractError(f"--camera {args.camera}: the dataset's 1-based camera number (1, 2, ...)")
    if args.batch_size < 1:
        raise ExtractError(f"--batch-size {args.batch_size} must be >= 1")


def stamp(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime in ns) of a file: what says whether it changed since the last run."""
    st = path.stat()
    return str(path.resolve()), int(st.st_size), int(st.st_mtime_ns)


def is_image(path: Path) -> bool:
    """An image file by its extension (the ones the data pipeline decodes)."""
    return path.suffix.lower().lstrip(".") in IMAGE_EXTS


def folder_images(folder: Path) -> list[Path]:
    """Every image file in a folder and below, sorted by path (hidden files and folders left out)."""
    found = [p for p in folder.rglob("*") if p.is_file() and is_image(p)
             and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    return sorted(found)


def _column(value: str, where: str, parse: Any) -> Any:
    """One optional list-file column: `-` is empty, else parsed; a bad value names the file and line."""
    if value == "-":
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise ExtractError(f"{where}: {exc}") from None


def _camera(value: str) -> int:
    """A list file's camera column: an int >= 1."""
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"camera {value!r} is not the dataset's 1-based camera number (1, 2, ...)")
    return int(value)


def _pid(value: str) -> int:
    """A list file's identity column: an integer."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"pid {value!r} is not an integer") from None


def _modality(value: str) -> str:
    """A list file's modality column, as its name."""
    from mip_dist.inference.extractor import MODALITY_NAMES, modality_label

    return MODALITY_NAMES[modality_label(int(value) if value.isdigit() else value)]


def read_list_file(path: Path) -> list[Entry]:
    """Entries of a list file: `PATH [MODALITY [CAMERA [PID]]]` per line, paths relative to its folder."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ExtractError(f"list file {path}: not readable as text ({exc})") from None
    entries = []
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        whole = Path(line) if Path(line).is_absolute() else path.parent / line
        fields = [line] if whole.is_file() else line.split()
        if len(fields) > 4:
            raise ExtractError(f"{where}: {len(fields)} columns; expected PATH [MODALITY [CAMERA [PID]]]")
        image = Path(fields[0]) if Path(fields[0]).is_absolute() else path.parent / fields[0]
        modality = _column(fields[1], where, _modality) if len(fields) > 1 else None
        camera = _column(fields[2], where, _camera) if len(fields) > 2 else None
        pid = _column(fields[3], where, _pid) if len(fields) > 3 else None
        entries.append(Entry(image, modality, camera, pid))
    return entries


def shard_stamps(folder: Path) -> list[tuple[str, int, int]]:
    """Stamps of a test-shard folder's index.json and of every test shard it lists."""
    from mip_dist.data.shard_index import read_index

    index = read_index(str(folder))
    shards = [folder / s["name"] for s in index["shards"] if s["split"] == "test"]
    if not shards:
        raise ExtractError(f"{folder / 'index.json'}: lists no test shards to extract")
    return [stamp(folder / "index.json"), *(stamp(s) for s in shards)]


def collect_inputs(names: list[str]) -> Inputs:
    """What every INPUT names; a missing path, an unknown kind of file or an empty result is an error."""
    files: list[Entry] = []
    folders: list[Path] = []
    stamps: list[tuple[str, int, int]] = []
    for name in names:
        path = Path(name)
        if path.is_dir() and (path / "index.json").is_file():
            folders.append(path)
            stamps.extend(shard_stamps(path))
        elif path.is_dir():
            found = folder_images(path)
            if not found:
                raise ExtractError(f"no images found in {path} (looked for {', '.join(IMAGE_EXTS)} files, "
                                   "recursively)")
            files.extend(Entry(p) for p in found)
        elif path.is_file() and path.suffix.lower() == LIST_SUFFIX:
            listed = read_list_file(path)
            if not listed:
                raise ExtractError(f"list file {path} names no images")
            stamps.append(stamp(path))
            files.extend(listed)
        elif path.is_file() and is_image(path):
            files.append(Entry(path))
        elif path.exists():
            raise ExtractError(f"{path}: not an image ({', '.join(IMAGE_EXTS)}), a list file ({LIST_SUFFIX}), "
                               "or a folder")
        else:
            raise ExtractError(f"input not found: {path}")
    for e in files:
        stamps.append(stamp(e.path) if e.path.is_file() else (str(e.path.resolve()), -1, -1))
    return Inputs(files, folders, stamps)


def fill_defaults(inputs: Inputs, modality: Optional[str], camera: Optional[int]) -> Inputs:
    """--modality / --camera for the images that carry none; images still without a modality are an error."""
    files = [e._replace(modality=e.modality or modality, camera=e.camera if e.camera is not None else camera)
             for e in inputs.files]
    missing = [e for e in files if e.modality is None]
    if missing:
        raise ExtractError(f"--modality is required: {len(missing)} image(s) carry no modality (e.g. "
                           f"{missing[0].path}); pass --modality visible or --modality infrared (one modality per "
                           "run), or give a list file with a modality column")
    return inputs._replace(files=files)


def inputs_digest(inputs: Inputs) -> str:
    """sha256 of the inputs' paths, sizes and mtimes and each image's modality/camera/pid as given."""
    doc = {"stamps": inputs.stamps,
           "labels": [[str(e.path), e.modality, e.camera, e.pid] for e in inputs.files]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def up_to_date(out: Path, settings: dict[str, Any]) -> Optional[int]:
    """The feature count of an existing output made from the same inputs, model and settings; else None."""
    try:
        existing = load_features(out)
    except FeatureFileError:
        return None
    meta = {**existing.meta, "model_sha256": existing.model_sha256, "config_sha256": existing.model.get("config_sha256"),
            "camera_offset": existing.model.get("camera_offset")}
    if any(meta.get(k) != v for k, v in settings.items()):
        return None
    return int(existing.features.shape[0])


def file_samples(entries: list[Entry]) -> Iterator[tuple[dict, Optional[torch.Tensor], Optional[str]]]:
    """(item, uint8 image or None, why not) of every listed image file, decoded as the test shards are."""
    from mip_dist.inference.extractor import decode_problem, read_image

    for e in entries:
        item = {"path": str(e.path.resolve()), "modality": e.modality, "camera": e.camera, "pid": e.pid}
        try:
            yield item, read_image(e.path), None
        except ValueError as exc:
            yield item, None, decode_problem(exc.__cause__ or exc)


def shard_samples(folder: Path) -> Iterator[tuple[dict, Optional[torch.Tensor], Optional[str]]]:
    """(item, uint8 image or None, why not) of every test image of a shard folder, read as the evaluator
    reads them (each shard checked against index.json; a changed one stops the run with a ShardError)."""
    from mip_dist.data.shard_index import check_split_keys, read_index
    from mip_dist.data.shard_reader import ErrorCounter, iter_shard_samples
    from mip_dist.data.transforms import decode_rgb
    from mip_dist.inference.extractor import MODALITY_NAMES, decode_problem

    index = read_index(str(folder))
    check_split_keys(str(folder), "test", index)
    records = {r["key"]: r for r in index["test_records"]}
    counter = ErrorCounter(1.0, f"test shards of {folder}")  # bad samples are skipped and listed, never fatal
    seen: set[str] = set()
    for shard in (s for s in index["shards"] if s["split"] == "test"):
        url = str(folder / shard["name"])
        for s in iter_shard_samples(url, counter, shard.get("bytes"), shard.get("sha256"), strict=True):
            seen.add(s.key)
            item = {"path": str(records.get(s.key, {}).get("path") or f"{url}#{s.key}"), "key": s.key,
                    "modality": MODALITY_NAMES[s.modality], "camera": s.camera, "pid": s.pid}
            try:
                yield item, decode_rgb(s.data, s.ext), None
            except Exception as exc:  # noqa: BLE001 - any decoder error: skip and list the image
                yield item, None, decode_problem(exc)
    for key, r in records.items():
        if key not in seen:
            yield ({"path": str(r.get("path") or key), "key": key}, None,
                   f"not readable from the shards of {folder} (see the warnings above)")


class Progress:
    """How far extraction is: a tqdm bar on a terminal, else a log line every PROGRESS_EVERY_S seconds."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", desc="extracting features", leave=False, dynamic_ncols=True)

    def update(self, images: int) -> None:
        """Count processed images (extracted or skipped); draw the bar or, when due, log a line."""
        self.done += images
        if self.bar is not None:
            self.bar.update(images)
            return
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = max(self.total - self.done, 0) / max(rate, 1e-9)
            log.info("extracting features: %d/%d images (%.0f%%), %.1f images/s, about %.0f s left", self.done,
                     self.total, 100 * self.done / max(self.total, 1), rate, left)

    def close(self) -> None:
        """Remove the bar (the final line follows)."""
        if self.bar is not None:
            self.bar.close()


def extract_all(fx: Any, samples: Iterator[tuple[dict, Optional[torch.Tensor], Optional[str]]], total: int
                ) -> tuple[torch.Tensor, list[dict], list[dict]]:
    """(features [N, D], items [N], skipped) of every sample, batch by batch; unreadable ones are skipped."""
    from mip_dist.inference.extractor import MODALITY_LABELS

    chunks, items, skipped = [torch.zeros(0, fx.dim)], [], []
    pending: list[tuple[dict, torch.Tensor]] = []
    progress = Progress(total)

    def flush() -> None:
        batch = torch.stack([fx.preprocess(img, it["path"]) for it, img in pending])
        labels = [MODALITY_LABELS[it["modality"]] for it, _ in pending]
        cameras = fx.camera_indices([it["camera"] for it, _ in pending], len(pending))
        chunks.append(fx.extract_batch(batch, labels, cameras))
        items.extend(it for it, _ in pending)
        progress.update(len(pending))
        pending.clear()

    try:
        for item, image, error in samples:
            if image is None:
                skipped.append({"path": item["path"], "error": error})
                progress.update(1)
                continue
            pending.append((item, image))
            if len(pending) == fx.batch_size:
                flush()
        if pending:
            flush()
    finally:
        progress.close()
    return torch.cat(chunks), items, skipped


def warn_skipped(skipped: list[dict]) -> None:
    """One warning naming the first unreadable images (the sidecar lists all of them)."""
    if not skipped:
        return
    named = "; ".join(f"{s['path']} ({s['error']})" for s in skipped[:MAX_NAMED_SKIPS])
    more = f"; and {len(skipped) - MAX_NAMED_SKIPS} more" if len(skipped) > MAX_NAMED_SKIPS else ""
    log.warning("skipped %d unreadable image(s), listed in the sidecar's \"skipped\": %s%s", len(skipped), named, more)


def run(args: argparse.Namespace) -> Path:
    """Everything after argument parsing; raises ExtractError / CheckpointError / ShardError for user mistakes."""
    from mip_dist.inference.extractor import FeatureExtractor

    check_args(args)
    out = Path(args.out)
    if out.is_dir():
        raise ExtractError(f"--out {out} is a folder; name the feature file FEATS{OUT_SUFFIX}")
    inputs = fill_defaults(collect_inputs(args.inputs), args.modality, args.camera)
    digest = inputs_digest(inputs)
    fx = FeatureExtractor(args.model, device=args.device, batch_size=args.batch_size, precision=args.precision,
                          flip=args.flip, config=args.config,
                          dataset=args.dataset)
    fx.camera_indices([e.camera for e in inputs.files], len(inputs.files))  # cameras fit the model's table
    settings = {"model_sha256": fx.model_info["sha256"], "flip": fx.flip, "precision": fx.precision,
                "inputs_sha256": digest, "config_sha256": fx.model_info.get("config_sha256"),
                "camera_offset": fx.model_info.get("camera_offset")}
    count = None if args.force else up_to_date(out, settings)
    if count is not None:
        print(f"up to date: {out} ({count} features from the same inputs, model and settings; --force recomputes)")
        return out
    total = len(inputs.files) + sum(len(_test_records(f)) for f in inputs.shard_folders)
    print(f"extracting {total} images with {args.model} on {fx.device} ({fx.precision}, flip={fx.flip}) "
          f"into {out}", flush=True)
    samples = _all_samples(inputs)
    t0 = time.perf_counter()
    feats, items, skipped = extract_all(fx, samples, total)
    seconds = time.perf_counter() - t0
    warn_skipped(skipped)
    if not items:
        raise ExtractError(f"none of the {len(skipped)} images could be read (e.g. {skipped[0]['path']}: "
                           f"{skipped[0]['error']}); nothing written")
    save_features(out, feats, items, fx.model_info, flip=fx.flip, precision=fx.precision, inputs_sha256=digest,
                  skipped=skipped)
    resized = f", {fx.resized} resized to {fx.img_size[0]}x{fx.img_size[1]}" if fx.resized else ""
    print(f"wrote {out} and {out.with_suffix('.json').name}: {len(items)} features of dim {fx.dim} in "
          f"{seconds:.1f} s, {(len(items) + len(skipped)) / max(seconds, 1e-9):.1f} images/s "
          f"({len(skipped)} skipped{resized})")
    return out


def _test_records(folder: Path) -> list[dict]:
    """index.json's test records of a shard folder (for the progress total)."""
    return json.loads((folder / "index.json").read_text()).get("test_records") or []


def _all_samples(inputs: Inputs) -> Iterator[tuple[dict, Optional[torch.Tensor], Optional[str]]]:
    """The image files first, then each test-shard folder's images."""
    yield from file_samples(inputs.files)
    for folder in inputs.shard_folders:
        yield from shard_samples(folder)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: 0 on success, 2 with a one-line message for any error (traceback with --debug)."""
    args = parse_args(argv)
    known = (ExtractError, CheckpointError, ConfigError, ShardError, FeatureFileError, ValueError)
    return run_command(lambda: run(args), debug_requested(args.debug), known)


if __name__ == "__main__":
    sys.exit(main())
