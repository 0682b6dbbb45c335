"""Identity chunks for the shard writer, and the PK batch quality they give (metadata-only simulation)."""
from collections import Counter

import pytest

from mip_dist.data.grouping import identity_chunks, image_key
from mip_dist.data.pk_sim import simulate


def test_chunks_hold_k_distinct_images_of_each_modality_of_one_identity():
    # identity 0: 5 visible + 2 infrared; identity 1: 4 + 4; identity 2: visible only
    labels = [0] * 7 + [1] * 8 + [2] * 3
    modalities = [1] * 5 + [0] * 2 + [1] * 4 + [0] * 4 + [1] * 3
    chunks = identity_chunks(labels, modalities, k=2, seed=0)
    written = Counter(slot.item for chunk in chunks for slot in chunk)
    assert set(written) == set(range(len(labels)))  # every image at least once
    for chunk in chunks:
        items = [slot.item for slot in chunk]
        assert len({labels[i] for i in items}) == 1
        if labels[items[0]] == 2:
            assert len(items) <= 4 and all(modalities[i] == 1 for i in items)
            continue
        assert [modalities[i] for i in items] == [1, 1, 0, 0]  # K visible, then K infrared
        assert len(set(items)) == 4  # distinct within the chunk (each modality has >= K images)
    assert sum(1 for c in chunks if labels[c[0].item] == 0) == 3  # ceil(5 / 2) chunks; infrared padded
    repeats = [slot for chunk in chunks for slot in chunk if slot.repeat]
    assert repeats and all(written[s.item] > 1 for s in repeats)
    assert identity_chunks(labels, modalities, k=2, seed=0) == chunks != identity_chunks(labels, modalities, 2, 1)


def test_image_key_strips_the_repeat_mark():
    assert image_key("cam1_0001_0002~3") == "cam1_0001_0002" == image_key("cam1_0001_0002")


@pytest.mark.parametrize("ids", [400, 5000])
def test_identity_chunks_give_batches_without_repeated_images(ids):
    """10 + 10 images per identity, 8 x (4 + 4) batches, a 2,000-sample buffer: globally shuffled shards
    repeat images and leave identities short; identity chunks do not, whatever the identity count. Every
    identity has K of each modality, so the floor is no repeat at all, also once an identity's earlier
    batches left an image and its padding copy behind in the buffer (400 identities: a fifth of the set)."""
    chunked = simulate(ids, 10, layout="chunks", batches=150)
    shuffled = simulate(ids, 10, layout="shuffled", batches=150)
    assert chunked.duplicate_fraction == 0.0 and chunked.short_identity_fraction == 0.0
    assert shuffled.duplicate_fraction > 0.02
    assert chunked.ms_per_batch < 50
