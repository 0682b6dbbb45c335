"""ONNX export of the evaluation forward (`MIP.extract`, plus flip averaging when the model's config asks for it),
checked against PyTorch with onnxruntime before the file is kept.

The graph:
    inputs   image     float32 [batch, 3, H, W]  RGB resized (bicubic) to model.img_size, x/255, then (x - 0.5) / 0.5:
                                                 exactly what `mip_dist.data.transforms.eval_transform` produces
             modality  int64   [batch]           0 infrared, 1 visible (`mip_dist.data.records`); only when the model
                                                 has modality prompts (MPL)
             camera    int64   [batch]           the dataset's 1-based camera number minus 1 (plus the dataset's camera
                                                 offset for a multi-dataset model); only when the model has SIE camera
                                                 embeddings
    output   features  float32 [batch, D]        L2-normalised test feature, the rows `extract_features` computes
The batch axis is dynamic; H and W are fixed. With `eval.flip` on in the model's config (or `flip=True`), the
graph averages with the horizontally flipped image and re-normalises, as the evaluator does
(`F.normalize(0.5 * (f(x) + f(x.flip(-1))))`); metadata key `flip` says which.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript: torch's default and maintained path) for
opset 18 and newer (the default, 18, is torchlib's own). It exports both layouts (paper, release) with a symbolic
batch and matches eager to ~5e-7. Opset 17 goes through the TorchScript exporter (`dynamo=False`, deprecated in
torch but exact here too): the dynamo exporter's ops start at 18 and onnx's version converter fails on this graph
(a Squeeze/Reduce axes input that is not a constant), silently keeping opset 18. The TorchScript exporter is
also the fallback when a dynamo export raises or writes another opset than asked; metadata `exporter` says
which ran. The weights are stored inside the .onnx file (no external-data file; ViT-B is ~350 MB, under
protobuf's 2 GB limit), so the one `<file>.sha256` sidecar covers the whole model.

Check: onnxruntime (CPUExecutionProvider) and PyTorch eager on random batches of two sizes (1 and 3, neither
the export's example batch of 2), tolerance max over rows of ||onnx_i - torch_i|| / ||torch_i|| <= 1e-4.

metadata_props (all strings; JSON where structured): format, model_file, model_sha256, layout, img_size,
feature_dim, input_names, inputs, output, flip, normalisation, num_cameras, datasets (multi-dataset models),
exporter, opset, check. `read_metadata(path)` returns them decoded.

`bench_onnx` measures img/s of PyTorch eager vs onnxruntime on this CPU.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mip_dist.config import Config
from mip_dist.data.records import INFRARED, VISIBLE
from mip_dist.data.transforms import MEAN, STD

log = logging.getLogger(__name__)

FORMAT = "mip-dist-onnx/1"
DEFAULT_OPSET = 18  # torchlib's own opset in torch 2.14: no version conversion of the graph
MIN_OPSET = 17  # LayerNormalization is an ONNX op from 17 on
DYNAMO_MIN_OPSET = 18  # torchlib's ops (the dynamo exporter's) start here; 17 goes through the TorchScript exporter
TOLERANCE = 1e-4  # max over rows of ||onnx_i - torch_i|| / ||torch_i||
CHECK_BATCH_SIZES = (1, 3)  # both differ from the example batch: the dynamic axis is exercised, batch 1 included
EXAMPLE_BATCH = 2  # torch.export specialises sizes 0 and 1, so the traced example batch is 2
MAX_BATCH = 65536
OUTPUT = "features"

MODALITY_MEANING = f"{INFRARED} infrared, {VISIBLE} visible (one per image)"
CAMERA_MEANING = ("the dataset's camera number minus 1 (0-based SIE index; plus the dataset's camera offset for a "
                  "model trained on several datasets)")
_QUIET_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")


class OnnxExportError(RuntimeError):
    """A user-facing export problem (unreadable model, unsupported setting, a failed check); one line."""


class OnnxCheckError(OnnxExportError):
    """onnxruntime's features differ from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class GraphInput:
    """One input of the exported graph."""

    name: str
    dtype: str
    shape: tuple[Union[int, str], ...]
    meaning: str

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "meaning": self.meaning}

    def describe(self) -> str:
        """`image     float32 [batch, 3, 128, 64]  <meaning>`."""
        return f"{self.name:<9} {self.dtype:<7} [{', '.join(str(s) for s in self.shape)}]  {self.meaning}"


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how it checked."""

    path: Path
    sha256: str
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    inputs: list[GraphInput]
    feature_dim: int
    flip: bool
    layout: str
    model_sha256: str
    check: Optional[dict] = None  # None with check=False
    seconds: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ loading


def load_for_export(model_path: str | Path, release_config: Optional[str | Path] = None
                    ) -> tuple[nn.Module, Config, str, dict]:
    """(model in eval mode on CPU with PyTorch attention, its config, the file's sha256, the loaded blob) from an
    exported model file or the authors' checkpoint (`mip_dist.inference.model_file`)."""
    from .model_file import build_from_blob, read_model_blob

    blob, digest = read_model_blob(model_path, release_config)
    impl = "concat" if blob["config"]["model"].get("attn_drop_rate", 0.0) > 0 else "torch"  # the fused kernel is a
    # training op (see eval_attention_impl); with attention dropout configured only "concat" is accepted
    model, cfg = build_from_blob(blob, model_path, attention_impl=impl)
    model.attention_impl = impl
    return model, cfg, digest, blob


# ------------------------------------------------------------------------------------------------ the graph


def eval_attention_impl(model: nn.Module) -> str:
    """The attention path to export and compare with: PyTorch's ("torch"; the fused Triton kernel is a training
    op), or the literal token concatenation for a model configured with attention dropout (the only impl its
    setter accepts; dropout is off in eval mode anyway)."""
    current = getattr(model, "attention_impl", "torch")
    if current in ("torch", "concat"):
        return current
    return "concat" if model.cfg.attn_drop_rate > 0 and getattr(model, "num_prompted", 0) else "torch"


def _on_cpu(model: nn.Module) -> None:
    devices = {p.device.type for p in model.parameters()}
    if devices - {"cpu"}:
        raise OnnxExportError(f"the model is on {', '.join(sorted(devices))}; export and check run on the CPU "
                              "(call model.cpu() first)")


def uses_modality(model: nn.Module) -> bool:
    """Whether `extract` reads the modality labels (modality prompts in at least one run block)."""
    return getattr(model, "mpl", None) is not None and getattr(model, "num_prompted", 0) > 0


def uses_camera(model: nn.Module) -> bool:
    """Whether `extract` reads the camera labels (SIE camera embeddings)."""
    return getattr(model, "sie_embed", None) is not None


def graph_inputs(model: nn.Module) -> list[GraphInput]:
    """The inputs the exported graph takes, in order."""
    h, w = (int(s) for s in model.cfg.img_size)
    inputs = [GraphInput("image", "float32", ("batch", 3, h, w),
                         f"RGB resized (bicubic) to {h}x{w}, x/255, then (x - {MEAN[0]}) / {STD[0]} per channel "
                         "(mip_dist.data.transforms.eval_transform)")]
    if uses_modality(model):
        inputs.append(GraphInput("modality", "int64", ("batch",), MODALITY_MEANING))
    if uses_camera(model):
        inputs.append(GraphInput("camera", "int64", ("batch",),
                                 f"{CAMERA_MEANING}, in [0, {model.num_cameras})"))
    return inputs


class FeatureGraph(nn.Module):
    """`model.extract` as an exportable module: image [B, 3, H, W], modality [B], camera [B] -> features [B, D].

    With `flip`, the image and its mirror run as one batch of 2B and the two features are averaged and
    re-normalised (the evaluator's formula; the forward is per-image, so one batch of 2B gives the same rows)."""

    def __init__(self, model: nn.Module, flip: bool) -> None:
        super().__init__()
        self.model = model
        self.flip = flip

    def forward(self, image: torch.Tensor, modality: Optional[torch.Tensor] = None,
                camera: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.flip:
            return self.model.extract(image, modality, camera)
        B = image.shape[0]
        twice = (lambda t: None if t is None else torch.cat([t, t]))
        f = self.model.extract(torch.cat([image, image.flip(-1)]), twice(modality), twice(camera))
        return F.normalize(0.5 * (f[:B] + f[B:]), dim=1)


@torch.inference_mode()
def reference_features(model: nn.Module, batch: dict[str, np.ndarray], flip: bool) -> np.ndarray:
    """PyTorch eager features of a batch, computed as `extract_features` does (two calls with flip)."""
    image = torch.from_numpy(batch["image"])
    modality = torch.from_numpy(batch["modality"]) if "modality" in batch else None
    camera = torch.from_numpy(batch["camera"]) if "camera" in batch else None
    feat = model.extract(image, modality, camera).float()
    if flip:
        feat = F.normalize(0.5 * (feat + model.extract(image.flip(-1), modality, camera).float()), dim=1)
    return feat.numpy()


def random_batch(model: nn.Module, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of the graph's inputs: uniform random pixels normalised as eval_transform does, both
    modalities, every camera in range."""
    g = torch.Generator().manual_seed(seed)
    h, w = (int(s) for s in model.cfg.img_size)
    pixels = torch.rand(batch_size, 3, h, w, generator=g)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    batch = {"image": ((pixels - mean) / std).numpy()}
    if uses_modality(model):
        batch["modality"] = (torch.arange(batch_size) % 2).numpy().astype(np.int64)
    if uses_camera(model):
        batch["camera"] = torch.randint(0, model.num_cameras, (batch_size,), generator=g).numpy().astype(np.int64)
    return batch


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """The exporters' progress prints, warnings and optimizer log lines off while exporting (library code
    logs its own summary instead)."""
    loggers = [logging.getLogger(n) for n in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _write_graph(graph: FeatureGraph, example: dict[str, torch.Tensor], path: Path, opset: int) -> str:
    """Export `graph` to `path` (one self-contained file) at exactly `opset`; returns the exporter that worked
    ("dynamo" or "torchscript"). The TorchScript exporter runs when the dynamo one raises, or for opset 17:
    torchlib's ops start at opset 18 and onnx's version converter cannot lower this graph (dynamo then keeps
    opset 18)."""
    names = list(example)
    image, kwargs = example["image"], {k: v for k, v in example.items() if k != "image"}
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    reason = ""
    with _quiet_exporters(), torch.no_grad():
        if opset >= DYNAMO_MIN_OPSET:
            try:
                torch.onnx.export(graph, (image,), str(path), kwargs=kwargs, dynamo=True, opset_version=opset,
                                  input_names=names, output_names=[OUTPUT],
                                  dynamic_shapes={n: {0: batch} for n in names}, external_data=False,
                                  optimize=True, verbose=False)
                got = _opset_of(path)
                if got == opset:
                    return "dynamo"
                reason = f"dynamo: wrote opset {got}, not {opset}"
            except Exception as exc:  # noqa: BLE001 - any dynamo failure: try the TorchScript exporter
                reason = f"dynamo: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning("dynamo ONNX export failed (%s); using the TorchScript exporter", reason)
            _remove(path)
        else:
            reason = f"dynamo: not tried (its ops start at opset {DYNAMO_MIN_OPSET})"
            log.info("opset %d: using the TorchScript exporter (the dynamo exporter's ops start at opset %d)",
                     opset, DYNAMO_MIN_OPSET)
        try:
            torch.onnx.export(graph, (image,), str(path), kwargs=kwargs, dynamo=False, opset_version=opset,
                              input_names=names, output_names=[OUTPUT],
                              dynamic_axes={**{n: {0: "batch"} for n in names}, OUTPUT: {0: "batch"}})
            return "torchscript"
        except Exception as exc:  # noqa: BLE001 - both failed: one line naming both
            _remove(path)
            raise OnnxExportError(f"ONNX export failed: {reason[:300]}; torchscript: {type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:300]}") from exc


def _session(path: Path, threads: Optional[int] = None) -> Any:
    """An onnxruntime CPU session (`threads` intra-op threads; None = onnxruntime's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_onnx(onnx_path: str | Path, model: nn.Module, flip: bool,
               batch_sizes: tuple[int, ...] = CHECK_BATCH_SIZES, tolerance: float = TOLERANCE) -> dict:
    """Run the graph with onnxruntime on random batches and compare with PyTorch eager: max over rows of
    ||onnx_i - torch_i|| / ||torch_i||. Returns {"batch_sizes", "max_rel_err", "per_batch", "tolerance",
    "passed"}; raises OnnxCheckError when the error exceeds the tolerance or the output is misshapen."""
    sess = _session(Path(onnx_path))
    names = [i.name for i in sess.get_inputs()]
    expected = [i.name for i in graph_inputs(model)]
    if names != expected:
        raise OnnxCheckError(f"{onnx_path}: graph inputs {names}, expected {expected}")
    per_batch = {}
    for seed, b in enumerate(batch_sizes):
        batch = random_batch(model, b, seed=seed)
        ref = reference_features(model, batch, flip)
        (out,) = sess.run([OUTPUT], batch)
        if out.shape != ref.shape:
            raise OnnxCheckError(f"{onnx_path}: onnxruntime returned features of shape {list(out.shape)} for a batch "
                                 f"of {b}; PyTorch {list(ref.shape)}")
        err = np.linalg.norm(out - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
        per_batch[str(b)] = float(err.max())
    worst = max(per_batch.values())
    result = {"batch_sizes": list(batch_sizes), "max_rel_err": worst, "per_batch": per_batch,
              "tolerance": tolerance, "metric": "max_i ||onnx_i - torch_i|| / ||torch_i||",
              "provider": "CPUExecutionProvider", "passed": bool(worst <= tolerance)}
    if not result["passed"]:
        raise OnnxCheckError(f"onnxruntime features differ from PyTorch's: max relative error {worst:.3g} > "
                             f"{tolerance:g} (batch sizes {', '.join(per_batch)})")
    return result


def _remove(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished file to `out` without ever replacing a file there (a hard link fails if `out` exists;
    where links are not supported, an existence check and a rename)."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise OnnxExportError(f"{out} appeared while exporting; not overwritten") from None
    except OSError:
        if out.exists():
            raise OnnxExportError(f"{out} appeared while exporting; not overwritten") from None
        tmp.replace(out)
        return
    tmp.unlink()


def _opset_of(path: Path) -> int:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Add metadata_props to the ONNX file (rewritten in place)."""
    import onnx

    m = onnx.load(str(path))
    existing = {p.key: p for p in m.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            m.metadata_props.add(key=key, value=value)
    onnx.save(m, str(path))


def read_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """The file's metadata_props, JSON values decoded (img_size, inputs, check, ...)."""
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    out: dict[str, Any] = {}
    for p in m.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


def check_destination(out_path: str | Path, opset: int) -> Path:
    """The output path, refused (one line) when it exists or the opset is too old; nothing is read or written."""
    out = Path(out_path)
    if out.exists() or out.is_symlink():
        raise OnnxExportError(f"{out} exists; remove it or choose another output file (it is never overwritten)")
    if opset < MIN_OPSET:
        raise OnnxExportError(f"--opset {opset}: the graph needs opset {MIN_OPSET} or newer (LayerNormalization)")
    return out


def export_module(model: nn.Module, out_path: str | Path, *, flip: bool = False, opset: int = DEFAULT_OPSET,
                  check: bool = True, model_sha256: str = "", model_file: str = "",
                  extra_metadata: Optional[dict[str, Any]] = None) -> ExportResult:
    """Export a built MIP (any attention impl: PyTorch attention is used for the export and restored after) to
    `out_path` (refused if it exists); with `check`, onnxruntime must match PyTorch or nothing is left behind.
    Writes no sidecar (export_onnx does)."""
    from mip_dist.engine.file_hash import sha256_file

    out = check_destination(out_path, opset)
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # removed again if the export fails
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    _on_cpu(model)
    was_training, impl = model.training, model.attention_impl
    model.eval()
    model.attention_impl = eval_attention_impl(model)
    t0 = time.perf_counter()
    inputs = graph_inputs(model)
    try:
        example = {k: torch.from_numpy(v) for k, v in random_batch(model, EXAMPLE_BATCH, seed=123).items()}
        exporter = _write_graph(FeatureGraph(model, flip).eval(), example, tmp, opset)
        feature_dim = _feature_dim(model)
        result = check_onnx(tmp, model, flip) if check else None
        metadata = {
            "format": FORMAT, "model_file": model_file, "model_sha256": model_sha256,
            "layout": str(model.cfg.layout), "img_size": json.dumps([int(s) for s in model.cfg.img_size]),
            "feature_dim": str(feature_dim), "input_names": ",".join(i.name for i in inputs),
            "inputs": json.dumps([i.to_json() for i in inputs]),
            "output": json.dumps({"name": OUTPUT, "dtype": "float32", "shape": ["batch", feature_dim],
                                  "meaning": "L2-normalised test feature (pre-BN global + local parts)"}),
            "flip": json.dumps(bool(flip)),
            "normalisation": json.dumps({"resize": "bicubic, antialias", "scale": "x/255", "mean": list(MEAN),
                                         "std": list(STD)}),
            "num_cameras": str(int(model.num_cameras)), "exporter": exporter, "opset": str(_opset_of(tmp)),
            "check": json.dumps(result) if result is not None else "not run (--no-check)",
            "torch": torch.__version__,
        }
        metadata.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()})
        _set_metadata(tmp, metadata)
        _publish(tmp, out)
    except BaseException:
        _remove(tmp)
        for d in made:  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    finally:
        model.attention_impl = impl
        model.train(was_training)
    seconds = time.perf_counter() - t0
    log.info("exported %s (%s exporter, opset %s, flip=%s, %d-d features) in %.1fs%s", out, exporter,
             metadata["opset"], flip, feature_dim, seconds,
             "" if result is None else f"; onnxruntime max relative error {result['max_rel_err']:.2e}")
    return ExportResult(path=out, sha256=sha256_file(out), exporter=exporter, opset=int(metadata["opset"]),
                        inputs=inputs, feature_dim=feature_dim, flip=flip, layout=str(model.cfg.layout),
                        model_sha256=model_sha256, check=result, seconds=seconds, metadata=metadata)


def export_onnx(model_path: str | Path, out_path: str | Path, opset: int = DEFAULT_OPSET, check: bool = True,
                flip: Optional[bool] = None, release_config: Optional[str | Path] = None) -> ExportResult:
    """Export an exported model file (or the authors' checkpoint) to ONNX at `out_path` plus `<out>.sha256`.

    flip: average with the flipped image in the graph; None = the model config's eval.flip. release_config: for the
    authors' checkpoint, the config file giving what its tensors cannot tell. Refuses an existing `out_path`
    before loading anything; a failed export or check leaves no file behind."""
    from mip_dist.engine.file_hash import write_sidecar

    out = check_destination(out_path, opset)
    model, cfg, digest, blob = load_for_export(model_path, release_config)
    use_flip = bool(cfg.eval.flip) if flip is None else bool(flip)
    extra = {}
    if blob.get("datasets"):
        extra["datasets"] = [{"name": d.get("name"), "camera_offset": d.get("camera_offset")} for d in blob["datasets"]]
    result = export_module(model, out, flip=use_flip, opset=opset, check=check, model_sha256=digest,
                           model_file=Path(model_path).name, extra_metadata=extra)
    try:
        write_sidecar(out, result.sha256)
    except BaseException:
        _remove(out)
        raise
    return result


# ------------------------------------------------------------------------------------------------ benchmark


def bench_onnx(model: Union[str, Path, nn.Module], batch_size: int = 16, seconds: float = 10.0,
               onnx_path: Optional[str | Path] = None, flip: Optional[bool] = None,
               threads: Optional[int] = None, rounds: int = 3) -> dict:
    """Images per second of PyTorch eager (`extract`, fp32, inference_mode) vs onnxruntime (CPU) on this machine.

    model: an exported model file (or the authors' checkpoint) or a built MIP. onnx_path: an already exported
    graph of that model (its flip setting is read from its metadata); None exports one to a temporary folder
    (checked, removed afterwards). flip: None = the config's eval.flip for a file, off for a module. threads:
    intra-op threads of both (default: torch's current count). Each side gets `seconds` in all: one warm-up
    batch, then `rounds` timed rounds (at least 2 batches each) of which the fastest counts (best-of, as timeit:
    the round least disturbed by other processes). Eager runs first, the onnxruntime session is created only
    after it (its idle threads then cannot slow eager down). On a shared machine compare `loadavg_1m` (read
    before the run): a load above the core count means other processes competed for the cores.
    Returns {"batch_size", "threads", "flip", "img_size", "feature_dim", "layout", "exporter", "eager_img_s",
    "onnx_img_s", "onnx_over_eager", "eager_batches", "onnx_batches", "export_s", "loadavg_1m", "cpu_count",
    "torch", "onnxruntime"}."""
    import onnxruntime as ort

    if isinstance(model, (str, Path)):
        module, cfg, _, _ = load_for_export(model)
        use_flip = bool(cfg.eval.flip) if flip is None else bool(flip)
    else:
        module, use_flip = model, bool(flip)
    if onnx_path is not None:
        use_flip = bool(read_metadata(onnx_path).get("flip", use_flip))  # compare like with like
    threads = int(threads or torch.get_num_threads())
    _on_cpu(module)
    was_training, impl = module.training, module.attention_impl
    module.eval()
    module.attention_impl = eval_attention_impl(module)
    export_s, exporter = 0.0, "given"
    with tempfile.TemporaryDirectory(prefix="mip_onnx_bench_") as tmpdir:
        try:
            path = Path(onnx_path) if onnx_path is not None else Path(tmpdir) / "model.onnx"
            if onnx_path is None:
                t0 = time.perf_counter()
                exporter = export_module(module, path, flip=use_flip).exporter
                export_s = time.perf_counter() - t0
            batch = random_batch(module, batch_size, seed=0)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                eager_n, eager_rate = _timed(lambda: reference_features(module, batch, use_flip), seconds, rounds)
            finally:
                torch.set_num_threads(before)
            sess = _session(path, threads)
            onnx_n, onnx_rate = _timed(lambda: sess.run([OUTPUT], batch), seconds, rounds)
        finally:
            module.attention_impl = impl
            module.train(was_training)
    eager, onnx_rate = eager_rate * batch_size, onnx_rate * batch_size
    out = {"batch_size": batch_size, "threads": threads, "flip": use_flip,
           "img_size": [int(s) for s in module.cfg.img_size], "feature_dim": int(_feature_dim(module)),
           "layout": str(module.cfg.layout), "exporter": exporter, "eager_img_s": round(eager, 2),
           "onnx_img_s": round(onnx_rate, 2), "onnx_over_eager": round(onnx_rate / eager, 3),
           "eager_batches": eager_n, "onnx_batches": onnx_n, "export_s": round(export_s, 1),
           "loadavg_1m": None if load is None else round(load, 2), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "onnxruntime": ort.__version__}
    log.info("bench_onnx: batch %d, %d threads: eager %.1f img/s, onnxruntime %.1f img/s (x%.2f)", batch_size,
             threads, eager, onnx_rate, onnx_rate / eager)
    return out


def _feature_dim(model: nn.Module) -> int:
    """Width of `extract`'s feature: C for the global token, plus C per JPM part."""
    return int(model.embed_dim) * (1 + int(getattr(model, "num_parts", 0)))


def _timed(step, seconds: float, rounds: int = 3, min_batches: int = 2) -> tuple[int, float]:
    """(batches run in all, batches per second of the fastest round) after one warm-up call; the rounds
    share `seconds`."""
    step()
    total, best = 0, 0.0
    for _ in range(max(1, rounds)):
        n, t0 = 0, time.perf_counter()
        while n < min_batches or time.perf_counter() - t0 < seconds / max(1, rounds):
            step()
            n += 1
        best = max(best, n / (time.perf_counter() - t0))
        total += n
    return total, best
