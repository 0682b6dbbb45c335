"""uint8 training batches finished on the device: the same images as the host-normalised float batches of
both augmentation chains, a third of the bytes, and no op that waits for the device."""
import pytest
import torch
from fake_cuda import SyncCounter, fake_cuda_mode

from mip_dist.config import DataConfig
from mip_dist.data.shards import write_shards
from mip_dist.data.stream import TrainStream, build_train_stream
from mip_dist.data.transforms import IMAGE_OPS, TrainAugment, finish_images
from mip_dist.demo.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 train ids x 6 cameras x 2 images in one shard."""
    base = tmp_path_factory.mktemp("device_batches")
    root = generate_synthetic(str(base / "syn"), num_train_ids=8, num_test_ids=2, images_per_camera=2,
                              img_size=(64, 32), seed=2, workers=1)
    write_shards("synthetic", str(root), str(base / "shards"), workers=1, progress=False, chunk_instances=2)
    return base / "shards"


def _stream_images(shards, augment: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Two epochs of the stream's images as the trainer gets them (channel exchange on)."""
    cfg = DataConfig(shards=str(shards), batch_size=8, num_instances=2, img_size=(64, 32), workers=0,
                     buffer_size=32, steps_per_epoch=3, augment=augment, channel_aug=True)
    stream = build_train_stream(cfg, seed=5, rank=0, world_size=1)
    return [TrainStream.device_images(b, "cpu", dtype) for _ in range(2) for b in stream]


@pytest.mark.parametrize("augment", ["paper", "light"])
def test_device_finished_batches_equal_the_host_normalised_ones(shards, augment, monkeypatch):
    """The stream as it was (float32 normalised on the host, cast by the trainer's copy) against uint8 images
    finished by device_images: equal in float32 and in bfloat16, erasing and grayscale included."""
    got = {dtype: _stream_images(shards, augment, dtype) for dtype in (torch.float32, torch.bfloat16)}
    real = TrainAugment.uint8
    monkeypatch.setattr(TrainAugment, "uint8", lambda self, images, visible: (
        finish_images(*real(self, images, visible), "cpu", torch.float32), {}))  # the host-normalised batch
    for dtype, images in got.items():
        before = _stream_images(shards, augment, dtype)
        assert len(before) == len(images) == 6
        assert all(torch.equal(a, b) for a, b in zip(before, images))
    if augment == "paper":  # the erasing fill (values outside [-1, 1]) made it through
        assert any(bool((x.abs() > 1).any()) for x in got[torch.float32])


def test_uint8_batch_moves_under_half_the_bytes_and_inputs_stay_unchanged():
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 80, 40), dtype=torch.uint8, generator=gen) for _ in range(16)]
    copies = [img.clone() for img in images]
    torch.manual_seed(1)
    batch, ops = TrainAugment((64, 32), "paper", channel_aug=True).uint8(images, [i < 8 for i in range(16)])
    assert batch.dtype == torch.uint8 and set(ops) == set(IMAGE_OPS)
    moved = batch.nbytes + sum(t.nbytes for t in ops.values())
    assert moved < 0.5 * batch.numel() * 4  # erasing fills on about half the images, at most a third of each
    assert all(torch.equal(a, b) for a, b in zip(images, copies))
    before = batch.clone()
    finish_images(batch, ops, "cpu", torch.float32)
    assert torch.equal(batch, before)  # finished into a new tensor


def test_finishing_on_a_cuda_device_waits_for_nothing():
    """No scalar read, data-dependent shape or device->host copy (fake CUDA tensors on a CPU machine)."""
    torch.manual_seed(3)
    images = [torch.randint(0, 256, (3, 64, 32), dtype=torch.uint8) for _ in range(8)]
    batch, ops = TrainAugment((64, 32), "paper").uint8(images, [True] * 4 + [False] * 4)
    assert int(ops["erase_box"][:, 2].gt(0).sum()) > 0 and bool(ops["grey"].any())  # both steps exercised
    with fake_cuda_mode(), SyncCounter() as counter:
        out = finish_images(batch, ops, "cuda", torch.bfloat16)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16 and out.shape == (8, 3, 64, 32)
    assert counter.ops == []
