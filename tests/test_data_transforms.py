"""Decoding and transforms: infrared to 3 channels, the grayscale/normalise order claim, channel augmentation,
the batched training augmentation against torchvision image by image."""
import io

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from mip_dist.data.transforms import (MEAN, STD, RandomChannel, TrainAugment, decode_rgb, decode_rgb_pil,
                                      eval_transform, split_chain, train_transform)


def _encode(mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    bands = [Image.effect_noise((24, 40), 40 + 10 * i) for i in range(3)]
    (Image.merge("RGB", bands) if mode == "RGB" else bands[0]).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png"), ("BMP", "bmp")])
def test_single_channel_images_become_three_equal_channels(fmt, ext):
    img = decode_rgb(_encode("L", fmt), ext)
    assert img.shape == (3, 40, 24) and img.dtype == torch.uint8
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    data = _encode("RGB", fmt)
    rgb = decode_rgb(data, ext)
    # the fast (torchvision) and the PIL decoder agree: exactly for lossless formats, to IDCT rounding for JPEG
    assert (rgb.int() - decode_rgb_pil(data).int()).abs().max() <= (0 if fmt != "JPEG" else 2)


def test_corrupt_bytes_raise():
    for data in (b"", b"\xff\xd8\xff\xe0garbage", _encode("RGB", "JPEG")[:50]):
        with pytest.raises(Exception):
            decode_rgb(data, "jpg")


def test_grayscale_commutes_with_the_equal_mean_std_normalisation():
    """Mean = std for every channel: grey before or after normalising is the same image, up to 1e-4
    (torchvision's luma weights 0.2989 + 0.587 + 0.114 sum to 0.9999)."""
    x = torch.rand(4, 3, 16, 8)
    norm = v2.Normalize(MEAN, STD)
    gray = v2.Grayscale(num_output_channels=3)
    assert torch.allclose(gray(norm(x)), norm(gray(x)), atol=2e-4)
    assert not torch.allclose(gray(norm(x)), norm(x), atol=1e-2)


def test_train_and_eval_transforms():
    img = decode_rgb(_encode("RGB", "JPEG"), "jpg")
    torch.manual_seed(0)
    a = train_transform((64, 32))(img)
    assert a.shape == (3, 64, 32) and a.dtype == torch.float32
    torch.manual_seed(0)
    assert torch.equal(a, train_transform((64, 32))(img))  # all randomness from torch's generator
    e = eval_transform((64, 32))
    assert torch.equal(e(img), e(img)) and e(img).abs().max() <= 1.0


def test_random_channel_replaces_colour():
    img = decode_rgb(_encode("RGB", "PNG"), "png")
    assert not torch.equal(img[0], img[1])
    for seed in range(8):
        torch.manual_seed(seed)
        out = RandomChannel(p=1.0)(img)
        assert out.shape == img.shape and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert torch.equal(RandomChannel(p=0.0)(img), img)


def test_light_augment_keeps_geometry_and_grayscale_only():
    names = lambda tf: [type(t).__name__ for t in tf.transforms]  # noqa: E731
    light, paper = names(train_transform((64, 32), "light")), names(train_transform((64, 32), "paper"))
    assert "RandomGrayscale" in light and "RandomCrop" in light
    assert not {"RandomErasing", "RandomChoice"} & set(light) and {"RandomErasing", "RandomChoice"} <= set(paper)
    img = decode_rgb(_encode("RGB", "JPEG"), "jpg")
    assert train_transform((64, 32), "light")(img).shape == (3, 64, 32)
    with pytest.raises(ValueError, match="augment"):
        train_transform((64, 32), "heavy")


@pytest.mark.parametrize("augment", ["light", "paper"])
@pytest.mark.parametrize("source_size", [(64, 32), (100, 50)], ids=["same-size", "resized"])
def test_batch_augment_matches_torchvision_image_by_image(augment, source_size):
    """TrainAugment's batched light chain: the same draws and the same pixels as channel exchange on the
    visible images followed by the torchvision chain, one image after the other."""
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, *source_size), dtype=torch.uint8, generator=gen) for _ in range(12)]
    visible = [i < 6 for i in range(12)]
    for channel_aug in (False, True):
        chain, channel = train_transform((64, 32), augment), RandomChannel(0.5)
        torch.manual_seed(5)
        expected = torch.stack([chain(channel(img) if channel_aug and vis else img)
                                for img, vis in zip(images, visible)])
        after = torch.rand(1)
        torch.manual_seed(5)
        got = TrainAugment((64, 32), augment, channel_aug)(images, visible)
        assert torch.equal(got, expected)
        assert torch.equal(torch.rand(1), after)  # the generator is left where the per-image chain leaves it


def test_split_chain_refuses_float_steps_finish_images_cannot_apply():
    """The shipped chains split at the float conversion; a fill of constants (or any other float step) is
    refused rather than silently dropped from the device-side finish."""
    chain = train_transform((64, 32), "paper")
    uint8_steps, tail = split_chain(chain)
    assert [type(t).__name__ for t in tail] == ["RandomErasing", "RandomGrayscale"]
    assert not any(isinstance(t, (v2.ToDtype, v2.Normalize)) for t in uint8_steps.transforms)
    constant = v2.Compose(list(chain.transforms[:-2]) + [v2.RandomErasing(0.5, value=0), chain.transforms[-1]])
    with pytest.raises(ValueError, match="cannot apply"):
        split_chain(constant)
