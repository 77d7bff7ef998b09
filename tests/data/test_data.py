import re
import sys

import pytest
import torch
from PIL import Image

from minidiff.data import embedded as data
from minidiff.data import Digits, ImageFolder, Shapes, load_dataset, random_translate, torchvision_dataset


def test_digits_shape_range_and_labels():
    digits = Digits(16)
    image, label = digits[0]
    assert len(digits) == 1797 and digits.num_classes == 10 and digits.channels == 1
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32 and isinstance(label, int)
    assert digits.images.min() == -1 and digits.images.max() == 1
    assert torch.equal(digits.labels.unique(), torch.arange(10))
    assert Digits(28)[0][0].shape == (1, 28, 28)


def test_digits_split_is_disjoint_stratified_and_deterministic():
    train, test, everything = Digits(16, split="train"), Digits(16, split="test"), Digits(16)
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert sorted(train.indices.tolist() + test.indices.tolist()) == list(range(1797))
    assert torch.equal(test.images, everything.images[test.indices])
    share = torch.bincount(test.labels, minlength=10) / torch.bincount(everything.labels, minlength=10)
    assert ((share - 0.2).abs() < 0.02).all()
    assert torch.equal(Digits(16, split="test").indices, test.indices)


def test_digits_bad_arguments():
    with pytest.raises(ValueError, match="split must be one of"):
        Digits(16, split="validation")
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        Digits(0)


def test_digits_without_scikit_learn_names_the_extra(monkeypatch):
    data._sklearn_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    try:
        with pytest.raises(ImportError, match=r"pip install minidiff\[digits\]"):
            Digits(16)
    finally:
        data._sklearn_digits.cache_clear()


def test_random_translate_moves_by_at_most_max_shift_without_flipping():
    image = -torch.ones(64, 1, 9, 9)
    image[:, 0, 4, 3] = 1  # one bright pixel left of the centre
    shifted = random_translate(image, 1, torch.Generator().manual_seed(0))
    rows, cols = (shifted[:, 0] == 1).nonzero()[:, 1:].T
    assert len(rows) == 64 and (rows - 4).abs().max() == 1 and (cols - 3).abs().max() == 1
    assert len({(r, c) for r, c in zip(rows.tolist(), cols.tolist())}) == 9  # all 9 shifts occur


def test_digits_augment_shifts_by_up_to_an_eighth_of_the_size():
    plain, augmented = Digits(16, split="test"), Digits(16, split="test", augment=True)
    torch.manual_seed(0)
    for index in range(10):
        padded = torch.nn.functional.pad(plain.images[index : index + 1], (2, 2, 2, 2), mode="replicate")[0]
        shifts = [padded[:, 2 + dy : 18 + dy, 2 + dx : 18 + dx] for dy in range(-2, 3) for dx in range(-2, 3)]
        image = augmented[index][0]
        assert any(torch.equal(image, shifted) for shifted in shifts)
    assert not all(torch.equal(augmented[i][0], plain.images[i]) for i in range(10))


def test_shapes_are_deterministic_from_seed_and_index():
    shapes = Shapes(32, num_samples=30, seed=3)
    image, label = shapes[7]
    assert image.shape == (3, 32, 32) and label == 7 % 3 and shapes.classes == ["circle", "square", "triangle"]
    assert torch.equal(Shapes(32, num_samples=100, seed=3)[7][0], image)
    assert not torch.equal(Shapes(32, num_samples=30, seed=4)[7][0], image)
    assert image.min() >= -1 and image.max() <= 1
    with pytest.raises(IndexError, match="out of range"):
        shapes[30]


def test_the_two_embedded_rgb_datasets_differ():
    shapes = torch.stack([Shapes(32, 60)[i][0] for i in range(60)])
    stripes = torch.stack([Shapes(32, 60, kind="stripes")[i][0] for i in range(60)])
    shapes_colour, stripes_colour = shapes.mean((0, 2, 3)), stripes.mean((0, 2, 3))
    assert (shapes_colour < -0.4).all()  # dark backgrounds
    assert stripes_colour.mean() > 0.2 and stripes_colour[0] > stripes_colour[2] + 0.5  # light and warm


def test_stripes_orientation_follows_the_label():
    stripes = Shapes(32, 30, kind="stripes")
    for index in range(0, 30, 3):  # label 0: horizontal stripes vary down the rows, not along them
        horizontal, vertical = stripes[index][0], stripes[index + 1][0]
        assert horizontal.var(dim=-1).mean() < horizontal.var(dim=-2).mean()
        assert vertical.var(dim=-2).mean() < vertical.var(dim=-1).mean()


def test_shapes_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        Shapes(kind="blobs")
    with pytest.raises(ValueError, match="num_samples"):
        Shapes(num_samples=0)


def _png(path, size, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_classes_from_subfolders(tmp_path):
    _png(tmp_path / "red" / "a.png", (20, 10), (255, 0, 0))
    _png(tmp_path / "red" / "b.jpg", (10, 10), (255, 0, 0))
    _png(tmp_path / "blue" / "c.png", (12, 30), (0, 0, 255))
    (tmp_path / "blue" / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path, 8)
    assert folder.classes == ["blue", "red"] and len(folder) == 3
    assert [label for _, label in folder.samples] == [0, 1, 1]
    image, label = folder[1]
    assert image.shape == (3, 8, 8) and label == 1
    assert torch.allclose(image, torch.tensor([1.0, -1.0, -1.0])[:, None, None])
    assert ImageFolder(tmp_path, 8, channels=1)[0][0].shape == (1, 8, 8)


def test_image_folder_center_crops(tmp_path):
    image = Image.new("RGB", (20, 10), (0, 255, 0))  # green left and right quarters, red middle
    image.paste((255, 0, 0), (5, 0, 15, 10))
    image.save(tmp_path / "wide.png")
    folder = ImageFolder(tmp_path, 8)
    assert folder.classes == [tmp_path.name] and folder[0][1] == 0
    assert torch.allclose(folder[0][0][:, :, 1:-1], torch.tensor([1.0, -1.0, -1.0])[:, None, None], atol=1e-5)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolder(tmp_path / "missing", 8)
    with pytest.raises(FileNotFoundError, match="no image files"):
        ImageFolder(tmp_path, 8)
    (tmp_path / "empty_class").mkdir()
    _png(tmp_path / "full_class" / "a.png", (8, 8), (0, 0, 0))
    with pytest.raises(FileNotFoundError, match="empty_class"):
        ImageFolder(tmp_path, 8)
    (tmp_path / "empty_class" / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolder(tmp_path, 8)[0]
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        ImageFolder(tmp_path, 8, channels=4)


def test_load_dataset_by_name_and_path(tmp_path):
    assert isinstance(load_dataset("digits", 8, split="test"), Digits)
    stripes = load_dataset("stripes", 16, num_samples=5)
    assert isinstance(stripes, Shapes) and stripes.kind == "stripes" and stripes[0][0].shape == (3, 16, 16)
    _png(tmp_path / "x" / "a.png", (8, 8), (0, 0, 0))
    assert isinstance(load_dataset(tmp_path, 8), ImageFolder)
    assert isinstance(load_dataset(str(tmp_path), 8), ImageFolder)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*digits.*stripes.*cifar10"):
        load_dataset("imagenet", 32)
    with pytest.raises(FileNotFoundError, match="not_there"):
        load_dataset(str(tmp_path / "not_there"), 32)
    with pytest.raises(ValueError, match="needs root="):
        load_dataset("mnist", 28)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path)) + ".*downloaded beforehand"):
        torchvision_dataset("mnist", tmp_path, 28)
    with pytest.raises(ValueError, match="unknown torchvision dataset"):
        torchvision_dataset("svhn", tmp_path, 32)
