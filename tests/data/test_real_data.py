"""scikit-image's real images as datasets (minidiff.data.real): determinism, value ranges, disjoint splits,
the error without the extra; the faces judge and the memorisation measure (minidiff.judge)."""
from __future__ import annotations

import builtins

import pytest
import torch

pytest.importorskip("skimage")

from minidiff.data import Crops, Faces, load_dataset, real  # noqa: E402
from minidiff.judge import Judge, face_judge_set, frechet_distance, memorization, nearest_neighbour_distances  # noqa: E402


@pytest.mark.parametrize("name", ["photos", "textures"])
def test_crops_are_deterministic_per_seed_and_in_range(name):
    a, b = load_dataset(name, 16, seed=3), load_dataset(name, 16, seed=3)
    images = torch.stack([a[i][0] for i in range(12)])
    assert images.shape == (12, 3, 16, 16) and images.dtype == torch.float32
    assert torch.equal(images, torch.stack([b[i][0] for i in range(12)]))
    assert -1 <= images.min() < 0 < images.max() <= 1
    other = load_dataset(name, 16, seed=4)
    assert not torch.equal(images, torch.stack([other[i][0] for i in range(12)]))
    assert [a[i][1] for i in range(12)] == [b[i][1] for i in range(12)]
    assert all(0 <= a[i][1] < a.num_classes for i in range(12))


def test_crops_one_channel_and_errors():
    gray = Crops(8, "photos", channels=1, num_samples=5)
    assert gray[0][0].shape == (1, 8, 8) and len(gray) == 5
    with pytest.raises(IndexError):
        gray[5]
    with pytest.raises(ValueError, match="kind"):
        Crops(8, "paintings")
    with pytest.raises(ValueError, match="split"):
        Crops(8, "photos", split="validation")
    with pytest.raises(ValueError, match="channels"):
        Crops(8, "photos", channels=2)


@pytest.mark.parametrize("name", ["photos", "textures"])
def test_crop_splits_come_from_disjoint_columns(name):
    """Training crops lie left of each image's cut, held-out crops right of it: no pixel is in both."""
    for split in ("train", "test"):
        dataset = Crops(8, name, split=split, num_samples=300, seed=1)
        for index in range(len(dataset)):
            label, top, left, side, _ = dataset.crop_box(index)
            height, width = dataset.sources[label].shape[-2:]
            cut = round(width * (1 - real.HELD_OUT_FRACTION))
            assert 0 <= top and top + side <= height and side >= 1
            assert (left + side <= cut) if split == "train" else (cut <= left and left + side <= width)
    assert Crops(8, name, split="all")._columns(1000) == (0, 1000)


def test_faces_split_is_fixed_and_disjoint():
    train, test, every = Faces(25, 1, "train"), Faces(25, 1, "test"), Faces(25, 1, "all")
    assert (len(train), len(test), len(every)) == (80, 20, 100)
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert torch.equal(Faces(25, 1, "test").images, test.images)
    assert train.images.shape == (80, 1, 25, 25) and -1 <= train.images.min() and train.images.max() <= 1
    faces, non_faces = real.lfw_subset()
    assert torch.equal(every.images, faces)  # 25 px: no resizing
    assert torch.equal(Faces(25, 1, "all", kind="non-faces").images, non_faces)
    rgb = load_dataset("faces", 32, split="test")
    image, label = rgb[0]
    assert image.shape == (3, 32, 32) and label == 0 and torch.equal(image[0], image[2])
    with pytest.raises(ValueError, match="kind"):
        Faces(32, kind="cats")


def test_faces_augment_mirrors():
    plain, mirrored = Faces(16, 1, "test"), Faces(16, 1, "test", augment=True)
    torch.manual_seed(0)
    items = [mirrored[0][0] for _ in range(20)]
    assert any(torch.equal(x, plain[0][0]) for x in items) and any(torch.equal(x, plain[0][0].flip(-1)) for x in items)


def test_missing_scikit_image_names_the_extra(monkeypatch):
    real.lfw_subset.cache_clear()
    real.source_image.cache_clear()
    real_import = builtins.__import__

    def no_skimage(name, *args, **kwargs):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    for name in ("faces", "photos", "textures"):
        with pytest.raises(ImportError, match=r"pip install minidiff\[data\]"):
            load_dataset(name, 16)
    monkeypatch.undo()
    real.lfw_subset.cache_clear()
    real.source_image.cache_clear()
    assert len(load_dataset("faces", 16)) == 80


# ------------------------------------------------------------------------------------------ judges
def test_face_judge_held_out_accuracy_above_floor(minidiff_cache):
    cache = minidiff_cache / "judge"  # the session's cache: the demo's test loads this judge
    judge = Judge.for_dataset("faces", 16, cache_dir=cache)
    assert judge.classes == ["non-face", "face"] and judge.channels == 1
    assert judge.test_accuracy >= 0.9
    test = face_judge_set(16, "test")
    report = judge.score(test.images, test.labels)
    assert report.per_class[1] >= 0.8 and report.per_class[0] >= 0.8
    assert Judge.for_dataset("faces", 16, cache_dir=cache).test_accuracy == judge.test_accuracy  # cached
    assert judge.features(test.images[:3]).shape == (3, 64)


def test_face_judge_sets_hold_out_the_test_faces():
    train, test = face_judge_set(16, "train"), face_judge_set(16, "test")
    assert int(test.labels.sum()) == 20 and int(train.labels.sum()) == 160  # 80 faces and their mirrors
    distances = nearest_neighbour_distances(test.images[test.labels == 1], train.images[train.labels == 1])
    assert distances.min() > 0.1  # no held-out face is among the training faces


def test_memorization_flags_copies_not_new_faces():
    train, held_out = Faces(16, 1, "train").images, Faces(16, 1, "test").images
    copies = train[:4] + 0.02 * torch.randn(4, 1, 16, 16)
    faded = 0.5 * train[4:6] + 0.5 * train.mean(0)  # a washed-out copy is still a copy
    report = memorization(torch.cat([copies, faded.flip(-1), held_out]), train, held_out)
    assert report.threshold == pytest.approx(min(report.held_out_distances), abs=1e-4)
    assert all(d < report.threshold for d in report.sample_distances[:6])
    assert report.near_copy_share == pytest.approx(6 / 26)
    average = train.mean(0, keepdim=True)  # what all faces share is no copy of any
    assert memorization(average, train, held_out).near_copy_share == 0
    with pytest.raises(ValueError, match="shape"):
        nearest_neighbour_distances(train[:, :, :8], train)


def test_frechet_distance_zero_for_equal_sets_and_grows_with_shift():
    a = torch.randn(500, 4, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(a, a + 1) == pytest.approx(4, rel=1e-3)  # ||mu_a - mu_b||^2 = 4 * 1^2
