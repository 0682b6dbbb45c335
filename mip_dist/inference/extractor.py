"""`FeatureExtractor`: a trained model's retrieval features for any images, computed exactly as evaluation does.

    from mip_dist.inference import FeatureExtractor
    fx = FeatureExtractor("runs/x/model_best.pt")           # an exported model or the MIP authors' file
    feats = fx(["a.jpg", "b.jpg"], "infrared", camera=3)    # [2, D] float32 on the CPU, L2-normalised rows

Preprocessing and forward pass are the evaluator's (`mip_dist.engine.evaluator.extract_features` over
`mip_dist.data.eval_loader`): the image bytes decoded by `decode_rgb`, `eval_transform` (bicubic resize to
model.img_size, scale to [0, 1], normalise), `model.extract(images, modality, camera - 1 + camera_offset)`,
optionally averaged with the horizontally flipped image and re-normalised, under bf16 autocast when asked.
Features of the same image therefore match the evaluator's to float rounding (1e-6).

Modality: "visible" / "infrared", or the model's own labels 1 (visible) / 0 (infrared), as the shards store
them. Camera: the dataset's 1-based camera number; where none is given the model's first camera (1) is used
for its camera embedding (SIE); a model trained without SIE ignores the camera.
"""
from __future__ import annotations

import contextlib
import logging
import re
from numbers import Integral
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mip_dist.data.records import INFRARED, VISIBLE
from mip_dist.data.transforms import decode_rgb, eval_transform, one_thread
from mip_dist.engine.export import trained_dataset_entry
from mip_dist.engine.file_hash import sha256_file

from .model_file import read_model_file

log = logging.getLogger(__name__)

MODALITY_LABELS = {"visible": VISIBLE, "infrared": INFRARED}  # the model's prompt libraries: 1 visible, 0 infrared
MODALITY_NAMES = {label: name for name, label in MODALITY_LABELS.items()}
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_CAMERA = 1  # used for the camera embedding where an image's camera is not known
ALLOWED_MODALITIES = "'visible' or 'infrared' (or the model's labels 1 = visible, 0 = infrared)"

ImageLike = Union[str, Path, Image.Image, torch.Tensor]


def decode_problem(exc: BaseException) -> str:
    """A decoder's error in a few words: torchvision's 'decode_png, /path/decode_png.cpp:66, ' prefix dropped."""
    text = " ".join(str(exc).split())
    return _DECODER_PREFIX.sub("", text) or type(exc).__name__


_DECODER_PREFIX = re.compile(r"^\w+, \S+\.cpp:\d+, ")


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 [3, H, W] of an image file, decoded as the test shards' bytes are (`decode_rgb`); raises naming it."""
    path = Path(path)
    try:
        return decode_rgb(path.read_bytes(), path.suffix.lstrip(".").lower() or "jpg")
    except Exception as exc:  # noqa: BLE001 - libjpeg/libpng/PIL/OS errors alike: name the file
        raise ValueError(f"{path}: not a readable image ({decode_problem(exc)})") from exc


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] of a PIL image (grey or palette images become RGB, as `decode_rgb` makes them)."""
    arr = np.array(img.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def modality_label(value: Any) -> int:
    """The model's label (1 visible / 0 infrared) of one modality name or label; ValueError naming the choices."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str) and value.strip().lower() in MODALITY_LABELS:
        return MODALITY_LABELS[value.strip().lower()]
    if isinstance(value, Integral) and not isinstance(value, bool) and int(value) in MODALITY_NAMES:
        return int(value)
    raise ValueError(f"modality {value!r} is not valid: use {ALLOWED_MODALITIES}")


def per_image(value: Any, n: int, what: str) -> list[Any]:
    """One value per image: a single value repeated, or a sequence of exactly n values."""
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.ndim else value.item()
    if isinstance(value, (str, Integral)) or value is None:
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{what}: {len(values)} values for {n} images (give one value, or one per image)")
    return values


def modality_labels(modality: Any, n: int) -> list[int]:
    """Per-image model labels from a name, a label, or a per-image sequence; a missing one is an error."""
    if modality is None:
        raise ValueError(f"modality is required: {ALLOWED_MODALITIES}, for all images or one per image")
    return [modality_label(m) for m in per_image(modality, n, "modality")]


def camera_numbers(camera: Any, n: int) -> list[int]:
    """Per-image 1-based camera numbers (None -> DEFAULT_CAMERA); anything else than an int >= 1 is an error."""
    out = []
    for c in per_image(camera, n, "camera"):
        if c is None:
            c = DEFAULT_CAMERA
        if isinstance(c, bool) or not isinstance(c, Integral) or int(c) < 1:
            raise ValueError(f"camera {c!r} is not valid: the dataset's 1-based camera number (1, 2, ...)")
        out.append(int(c))
    return out


def resolve_device(device: Optional[str | torch.device]) -> torch.device:
    """None / "auto" -> the GPU when one is visible, else the CPU; asking for a missing GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device}: no CUDA GPU is visible here; use the CPU ('cpu')")
    return device


def resolve_precision(precision: Optional[str], device: torch.device) -> str:
    """None -> bf16 on GPUs that support it (as evaluation), fp32 elsewhere; bf16 on the CPU only when asked."""
    if precision is None:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def _autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass when bf16 is asked for (the evaluator's rule)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class FeatureExtractor:
    """A trained model that turns images into L2-normalised retrieval features, as evaluation computes them.

    checkpoint: an exported model (model_best.pt / model_final.pt) or the MIP authors' checkpoint; its
    `<file>.sha256` sidecar, where present, is checked. device: None = the GPU when visible, else the CPU.
    precision: "fp32" / "bf16"; None = bf16 on a GPU, fp32 on the CPU. flip: average with the flipped image;
    None = the model's saved eval.flip, as evaluation uses it. dataset: for a model trained on several datasets
    (`datasets` in the exported file), the name of the one the images come from: its cameras' place in the
    model's camera table (required there, refused otherwise, as in launch/evaluate.py). config: for the
    authors' checkpoint only, a config file giving what its tensors cannot tell (image size, heads, eval.flip; see
    `mip_dist.inference.model_file`).
    """

    def __init__(self, checkpoint: str | Path, device: Optional[str | torch.device] = None, batch_size: int = 64,
                 precision: Optional[str] = None, flip: Optional[bool] = None, dataset: Optional[str] = None,
                 config: Optional[str | Path] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        self.path = Path(checkpoint)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.dtype = PRECISIONS[self.precision]
        model, cfg, sha256, blob = read_model_file(self.path, release_config=config)
        self.model = model.to(self.device)
        self.config = cfg
        self.batch_size = int(batch_size)
        self.flip = bool(cfg.eval.flip if flip is None else flip)
        entry = trained_dataset_entry(blob, dataset, str(self.path))  # DatasetChoiceError names the choices
        self.camera_offset = int(entry["camera_offset"]) if entry else 0
        self.num_cameras = int(blob["num_cameras"])
        self.img_size = (int(cfg.model.img_size[0]), int(cfg.model.img_size[1]))
        self.dim = int(model.embed_dim * (1 + model.num_parts))
        self.model_info = {"path": str(self.path.resolve()), "sha256": sha256, "layout": cfg.model.layout}
        if entry:
            self.model_info.update(dataset=dataset, camera_offset=self.camera_offset)
        if config is not None:  # the authors' file: its features also depend on the config given with it
            self.model_info.update(config=str(config), config_sha256=sha256_file(config))
        self.resized = 0  # images so far whose size was not img_size (resized; warned once)
        self._transform = eval_transform(self.img_size)
        log.info("feature extractor: %s (%s layout, sha256 %s...), %d-dim features, %dx%d input, flip=%s, %s on %s",
                 self.path, cfg.model.layout, sha256[:12], self.dim, *self.img_size, self.flip, self.precision,
                 self.device)

    def __call__(self, images: Union[Sequence[ImageLike], torch.Tensor], modality: Any,
                 camera: Any = None) -> torch.Tensor:
        """Features [N, D] float32 on the CPU (L2-normalised rows) of N images.

        images: paths, PIL images, uint8 (0-255) or float (0-1, not normalised) tensors [3, H, W], or one
        [N, 3, H, W] tensor; any size (resized to img_size as evaluation does). modality: one value or one per
        image ("visible" / "infrared", or 1 / 0). camera: the dataset's 1-based camera number, one or one per
        image; None = camera 1.
        """
        n = int(images.shape[0]) if isinstance(images, torch.Tensor) else len(images)
        labels = modality_labels(modality, n)
        cameras = self.camera_indices(camera, n)
        chunks = [torch.zeros(0, self.dim)]
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            batch = torch.stack([self.preprocess(images[i], f"image {i}") for i in range(start, stop)])
            chunks.append(self.extract_batch(batch, labels[start:stop], cameras[start:stop]))
        return torch.cat(chunks)

    def camera_indices(self, camera: Any, n: int) -> list[int]:
        """0-based rows of the model's camera table; a camera past the table is an error naming its size."""
        numbers = camera_numbers(camera, n)
        if self.model.sie_embed is None:
            return [c - 1 for c in numbers]  # unused by a model without SIE
        room = self.num_cameras - self.camera_offset
        bad = [c for c in numbers if c > room]
        if bad:
            raise ValueError(f"camera {bad[0]} is not in the model's camera table ({room} cameras: 1..{room}"
                             f"{f' after offset {self.camera_offset}' if self.camera_offset else ''})")
        return [c - 1 + self.camera_offset for c in numbers]

    def preprocess(self, image: ImageLike, name: str = "image") -> torch.Tensor:
        """One image as the model's float32 [3, H, W] input (decode, resize, normalise: the test loader's chain);
        `name` names it in errors and the size warning."""
        name = str(image) if isinstance(image, (str, Path)) else name
        if isinstance(image, (str, Path)):
            image = read_image(image)
        elif isinstance(image, Image.Image):
            image = pil_to_tensor(image)
        elif not isinstance(image, torch.Tensor):
            raise ValueError(f"{name}: a {type(image).__name__}; expected a path, a PIL image or a tensor")
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"{name}: tensor of shape {tuple(image.shape)}; expected [3, H, W] (or [1, H, W])")
        if image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        if image.is_floating_point() and image.dtype != torch.float32:
            image = image.float()
        elif not image.is_floating_point() and image.dtype != torch.uint8:
            raise ValueError(f"{name}: {image.dtype} tensor; expected uint8 (0-255) or float (0-1)")
        self._note_size(name, tuple(image.shape[1:]))
        with one_thread():
            return self._transform(image.cpu())

    def _note_size(self, name: str, size: tuple[int, ...]) -> None:
        """Count an image whose size is not the model's; the first one is named in a single warning."""
        if size == self.img_size:
            return
        self.resized += 1
        if self.resized == 1:
            log.warning("%s is %dx%d (HxW), not the model's %dx%d input: resizing it, and any other such image, "
                        "bicubic as evaluation does (warned once)", name, *size, *self.img_size)

    def extract_batch(self, images: torch.Tensor, modality: Sequence[int], camera: Sequence[int]) -> torch.Tensor:
        """Features [B, D] of preprocessed images, model labels and 0-based camera rows: the evaluator's forward."""
        x = images.to(self.device)
        mod = torch.as_tensor(list(modality), dtype=torch.long, device=self.device)
        cam = torch.as_tensor(list(camera), dtype=torch.long, device=self.device)
        with torch.inference_mode(), _autocast(self.device, self.dtype):
            feat = self.model.extract(x, mod, cam).float()
            if self.flip:
                feat = F.normalize(0.5 * (feat + self.model.extract(x.flip(-1), mod, cam).float()), dim=1)
        return feat.cpu()
