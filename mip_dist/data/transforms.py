"""Image decoding and the train / test transforms (torchvision.transforms.v2), shared by the stream and benchmarks.

Train chain (the MIP paper's, inherited from TransReID): resize (bicubic) -> horizontal flip 0.5 -> pad 10 + random crop ->
one of [ColorJitter(brightness .3, contrast .3), GaussianBlur(21, sigma 0.1-3)] -> float, normalise
(mean = std = 0.5) -> RandomErasing(0.5, random values) -> RandomGrayscale(0.5).
RandomGrayscale runs on the normalised tensor; since mean and std are equal for all three channels
and the luma weights sum to 1 (0.9999 in torchvision), grey(normalise(x)) == normalise(grey(x)) to
1e-4: applying it before or after normalisation is the same.
All randomness comes from torch's generator, so seeding it per batch makes a batch reproducible.
`TrainAugment` applies the chain to a batch (with channel exchange); the light chain runs as batch ops.
`TrainAugment.uint8` stops where the chain turns float: uint8 images plus the draws of the float steps
(grayscale flags, erasing boxes and their random fill), a third of the float32 batch's bytes to move to
the device (a quarter without erasing);
`finish_images` applies the float steps there, to the same values as the chain on the host.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterator, Optional, Union

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
IMAGE_OPS = ("grey", "erase_box", "erase_fill")  # the float steps' draws that go with uint8 images
CROP_PADDING = 10  # train_transform's Pad before its RandomCrop


class TrainAugment:
    """A batch's training augmentation: channel exchange on its visible images (optional), then the chain of
    `train_transform`, drawing from torch's generator image after image in the order that chain does.

    The "light" chain is applied to the whole batch once its images have drawn their flip, crop offsets and
    grayscale: the same draws and the same pixels as torchvision running the chain image by image (tested),
    but the float conversion and normalisation run as batch ops and the crop as slices: 4.8 -> 1.7 ms per
    batch of 16 images at 128x64 on 2 AVX2 cores (`launch/bench_demo.py --data`; a per-image chain pays
    torchvision's dispatch on each of its 7 steps). The "paper" chain runs image by image up to its float
    steps. Input images are never modified (the stream's cache hands out the same tensors every epoch)."""

    def __init__(self, img_size: tuple[int, int], augment: str = "paper", channel_aug: bool = False) -> None:
        self.size = (int(img_size[0]), int(img_size[1]))
        self.uint8_steps, self.float_steps = split_chain(train_transform(self.size, augment))  # checks `augment`
        self.channel = RandomChannel(0.5) if channel_aug else None
        self.batched = augment == "light"

    def __call__(self, images: list[torch.Tensor], visible: list[bool]) -> torch.Tensor:
        """uint8 [3, h, w] images (any size) -> float32 [B, 3, H, W], normalised (`uint8` finished on the host)."""
        batch, ops = self.uint8(images, visible)
        return finish_images(batch, ops, "cpu", torch.float32)

    def uint8(self, images: list[torch.Tensor], visible: list[bool]) -> tuple[torch.Tensor, dict]:
        """uint8 [3, h, w] images -> uint8 [B, 3, H, W] and the float steps' draws (`finish_images` applies them):
        the same generator draws, in the same order, as the whole chain."""
        if not self.batched:
            kept, steps = [], []
            for img, vis in zip(images, visible):
                kept.append(self.uint8_steps(self._channel(img, vis)))
                steps.append(self._draw_float_steps(kept[-1]))
            return torch.stack(kept), _image_ops(steps)
        h, w = self.size
        kept, offsets, steps = [], [], []
        for img, vis in zip(images, visible):  # the draws of RandomHorizontalFlip, RandomCrop, RandomGrayscale
            img = v2.functional.resize(self._channel(img, vis), [h, w], interpolation=v2.InterpolationMode.BICUBIC,
                                       antialias=True)
            kept.append(v2.functional.horizontal_flip(img) if torch.rand(1) < 0.5 else img)
            offsets.append((int(torch.randint(0, 2 * CROP_PADDING + 1, size=())),
                            int(torch.randint(0, 2 * CROP_PADDING + 1, size=()))))
            steps.append(self._draw_float_steps(kept[-1]))
        padded = v2.functional.pad(torch.stack(kept), [CROP_PADDING])
        batch = torch.stack([padded[i, :, top:top + h, left:left + w] for i, (top, left) in enumerate(offsets)])
        return batch, _image_ops(steps)

    def _draw_float_steps(self, img: torch.Tensor) -> tuple[bool, Optional[tuple[int, int, int, int]],
                                                                Optional[torch.Tensor]]:
        """(grey, erase box (top, left, h, w), erase fill) of one image: the draws torchvision's RandomErasing and
        RandomGrayscale make (`torch.rand(1) >= p` skips, then the erasing's own parameters), not their pixels."""
        grey, box, fill = False, None, None
        for step in self.float_steps:
            if torch.rand(1) >= step.p:
                continue
            if isinstance(step, v2.RandomGrayscale):
                grey = True
            else:
                params = step.make_params([img])
                if params["v"] is not None:
                    box, fill = (params["i"], params["j"], params["h"], params["w"]), params["v"]
        return grey, box, fill

    def _channel(self, img: torch.Tensor, visible: bool) -> torch.Tensor:
        """Channel exchange on a visible image, when enabled."""
        return self.channel(img) if self.channel is not None and visible else img


def split_chain(chain: v2.Compose) -> tuple[v2.Compose, list[v2.Transform]]:
    """A training chain as (its uint8 steps, its float steps after ToDtype + Normalize(MEAN, STD)); the float
    steps must be ones `finish_images` can apply: RandomGrayscale, and RandomErasing filling random values
    before it (the order of the shipped chains)."""
    steps = list(chain.transforms)
    cut = next(i for i, t in enumerate(steps) if isinstance(t, v2.ToDtype))
    norm = steps[cut + 1]
    if not (isinstance(norm, v2.Normalize) and tuple(norm.mean) == MEAN and tuple(norm.std) == STD
            and len(set(MEAN)) == len(set(STD)) == 1):
        raise ValueError(f"the chain's float conversion must be followed by Normalize({MEAN}, {STD}), one mean "
                         "and one std for all channels")
    tail = steps[cut + 2:]
    kinds = [type(t).__name__ for t in tail]
    if kinds not in (["RandomGrayscale"], ["RandomErasing", "RandomGrayscale"]) or \
            any(isinstance(t, v2.RandomErasing) and t.value is not None for t in tail):
        raise ValueError(f"finish_images cannot apply the float steps {kinds} (random erasing, then grayscale)")
    return v2.Compose(steps[:cut]), tail


def _image_ops(steps: list[tuple[bool, Optional[tuple[int, int, int, int]], Optional[torch.Tensor]]]) -> dict:
    """Per-image draws as batch tensors: grey bool [B], erase_box int64 [B, 4] (top, left, h, w; h = 0: none),
    erase_fill float32 [N] (the boxes' [3, h, w] fills, flattened in image order)."""
    boxes = [box or (0, 0, 0, 0) for _, box, _ in steps]
    fills = [fill.reshape(-1) for _, _, fill in steps if fill is not None]
    return {"grey": torch.tensor([grey for grey, _, _ in steps], dtype=torch.bool),
            "erase_box": torch.tensor(boxes, dtype=torch.int64).reshape(len(steps), 4),
            "erase_fill": torch.cat(fills) if fills else torch.zeros(0, dtype=torch.float32)}


def finish_images(images: torch.Tensor, ops: Optional[dict], device: Union[str, torch.device],
                  dtype: torch.dtype) -> torch.Tensor:
    """A batch on `device` in `dtype`: uint8 images are scaled, normalised, erased and greyed there with the
    ops torchvision runs on the host (same values; float32 until the final cast), so a third of the bytes
    cross the bus (the erasing fills are float32); float images (already finished) are only moved. No op
    waits for the device: the erase boxes are read from the host tensor, fills and flags copied without blocking."""
    if images.is_floating_point():
        return images.to(device, dtype=dtype, non_blocking=True)
    device = torch.device(device)
    x = v2.functional.to_dtype(images.to(device, non_blocking=True), torch.float32, scale=True)
    x = x.sub_(MEAN[0]).div_(STD[0])  # torchvision's Normalize (one mean, one std for all channels), without
    # the [3, 1, 1] constants it would copy to the device on every call (a blocking copy)
    if ops is not None:
        fill, start = ops["erase_fill"].to(device, non_blocking=True), 0
        for i, (top, left, h, w) in enumerate(ops["erase_box"].tolist()):
            if h:
                x[i, :, top:top + h, left:left + w] = fill[start:start + 3 * h * w].view(3, h, w)
                start += 3 * h * w
        grey = ops["grey"].to(device, non_blocking=True).view(-1, 1, 1, 1)
        x = torch.where(grey, v2.functional.rgb_to_grayscale(x, num_output_channels=3), x)
    return x.to(dtype)


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
