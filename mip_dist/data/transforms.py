"""Image decoding and the train / test transforms (torchvision.transforms.v2), shared by the stream and benchmarks.

Train chain (the MIP paper's, inherited from TransReID): resize (bicubic) -> horizontal flip 0.5 -> pad 10 + random crop ->
one of [ColorJitter(brightness .3, contrast .3), GaussianBlur(21, sigma 0.1-3)] -> float, normalise
(mean = std = 0.5) -> RandomErasing(0.5, random values) -> RandomGrayscale(0.5).
RandomGrayscale runs on the normalised tensor; since mean and std are equal for all three channels
and the luma weights sum to 1 (0.9999 in torchvision), grey(normalise(x)) == normalise(grey(x)) to
1e-4: applying it before or after normalisation is the same.
All randomness comes from torch's generator, so seeding it per batch makes a batch reproducible.
`TrainAugment` applies the chain to a batch (with channel exchange); the light chain runs as batch ops.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
FAST_DECODE_EXTS = ("jpg", "jpeg", "png")
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff", "gif")


def decode_rgb(data: bytes, ext: str = "jpg") -> torch.Tensor:
    """Image bytes -> uint8 [3, H, W]; single-channel (infrared) images are replicated to 3 channels.

    Raises on corrupt or truncated data (libjpeg/libpng via torchvision, PIL for other formats)."""
    if not data:
        raise ValueError("empty image data")
    if ext.lower() in FAST_DECODE_EXTS:
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(img.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def decode_rgb_pil(data: bytes) -> torch.Tensor:
    """The same result through PIL only (what a torchvision ImageFolder loader does); for benchmarks."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.array(img.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class RandomChannel(torch.nn.Module):
    """Channel augmentation (CAJ-style channel exchange): with probability p, replace all three
    channels of a visible image by one of R, G, B or its grey level, so colour cannot be relied on."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """uint8 or float [3, H, W] -> same shape and dtype."""
        if torch.rand(()) >= self.p:
            return img
        choice = int(torch.randint(0, 4, ()))
        if choice < 3:
            return img[choice:choice + 1].expand_as(img).clone()
        return v2.functional.rgb_to_grayscale(img, num_output_channels=3)


def train_transform(img_size: tuple[int, int], augment: str = "paper") -> v2.Compose:
    """Training augmentation on a uint8 [3, H, W] tensor -> float32 normalised.

    "paper": MIP's chain (resize, flip, pad+crop, jitter-or-blur, erasing, grayscale); "light": resize,
    flip, pad+crop and grayscale only (grayscale is what bridges colour and infrared), for small models
    trained from scratch (the demo), where blur and erasing on 64-pixel-wide images hide the signal."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment {augment!r} is not one of {AUGMENTS}")
    h, w = int(img_size[0]), int(img_size[1])
    geometric = [
        v2.Resize((h, w), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(0.5),
        v2.Pad(10),
        v2.RandomCrop((h, w)),
    ]
    if augment == "light":
        return v2.Compose(geometric + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
                                       v2.RandomGrayscale(0.5)])
    return v2.Compose(geometric + [
        v2.RandomChoice([v2.ColorJitter(brightness=0.3, contrast=0.3), v2.GaussianBlur(21, sigma=(0.1, 3.0))]),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
        v2.RandomErasing(0.5, value="random"),
        v2.RandomGrayscale(0.5),
    ])


AUGMENTS = ("paper", "light")
CROP_PADDING = 10  # train_transform's Pad before its RandomCrop


class TrainAugment:
    """A batch's training augmentation: channel exchange on its visible images (optional), then the chain of
    `train_transform`, drawing from torch's generator image after image in the order that chain does.

    The "light" chain is applied to the whole batch once its images have drawn their flip, crop offsets and
    grayscale: the same draws and the same pixels as torchvision running the chain image by image (tested),
    but the float conversion and normalisation run as batch ops and the crop as slices: 4.8 -> 1.7 ms per
    batch of 16 images at 128x64 on 2 AVX2 cores (`launch/bench_demo.py --data`; a per-image chain pays
    torchvision's dispatch on each of its 7 steps). The "paper" chain runs image by image. Input images are
    never modified (the stream's cache hands out the same tensors every epoch)."""

    def __init__(self, img_size: tuple[int, int], augment: str = "paper", channel_aug: bool = False) -> None:
        self.size = (int(img_size[0]), int(img_size[1]))
        self.per_image = train_transform(self.size, augment)  # checks `augment`
        self.channel = RandomChannel(0.5) if channel_aug else None
        self.batched = augment == "light"

    def __call__(self, images: list[torch.Tensor], visible: list[bool]) -> torch.Tensor:
        """uint8 [3, h, w] images (any size) -> float32 [B, 3, H, W], normalised."""
        if not self.batched:
            return torch.stack([self.per_image(self._channel(img, vis)) for img, vis in zip(images, visible)])
        h, w = self.size
        kept, offsets, greys = [], [], []
        for img, vis in zip(images, visible):  # the draws of RandomHorizontalFlip, RandomCrop, RandomGrayscale
            img = v2.functional.resize(self._channel(img, vis), [h, w], interpolation=v2.InterpolationMode.BICUBIC,
                                       antialias=True)
            kept.append(v2.functional.horizontal_flip(img) if torch.rand(1) < 0.5 else img)
            offsets.append((int(torch.randint(0, 2 * CROP_PADDING + 1, size=())),
                            int(torch.randint(0, 2 * CROP_PADDING + 1, size=()))))
            greys.append(bool(torch.rand(1) < 0.5))
        padded = v2.functional.pad(torch.stack(kept), [CROP_PADDING])
        batch = torch.stack([padded[i, :, top:top + h, left:left + w] for i, (top, left) in enumerate(offsets)])
        batch = v2.functional.normalize(v2.functional.to_dtype(batch, torch.float32, scale=True), MEAN, STD)
        for i in (i for i, grey in enumerate(greys) if grey):
            batch[i] = v2.functional.rgb_to_grayscale(batch[i], num_output_channels=3)
        return batch

    def _channel(self, img: torch.Tensor, visible: bool) -> torch.Tensor:
        """Channel exchange on a visible image, when enabled."""
        return self.channel(img) if self.channel is not None and visible else img


def eval_transform(img_size: tuple[int, int]) -> v2.Compose:
    """Evaluation: resize (bicubic) and normalise only."""
    h, w = int(img_size[0]), int(img_size[1])
    return v2.Compose([
        v2.Resize((h, w), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Per-image transforms are tiny ops: intra-op threads only contend (DataLoader workers already
    run single-threaded; this does the same when a loader runs in the main process)."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)
