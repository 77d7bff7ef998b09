import math

import pytest
import torch
from torch.utils.data import Subset

from minidiff.data import Digits, Shapes
from minidiff.judge import JUDGE_VERSION, Judge, JudgeReport, default_cache_dir


@pytest.fixture(scope="module")
def cache_dir(minidiff_cache):
    return minidiff_cache / "judge"  # where the examples' tests find the same judge


@pytest.fixture(scope="module")
def judge(cache_dir):
    return Judge.for_dataset("digits", image_size=8, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def test_split():
    return Digits(8, split="test")


def test_judge_is_accurate_on_the_real_test_split(judge, test_split):
    report = judge.score(test_split.images, test_split.labels)
    assert isinstance(report, JudgeReport) and report.count == len(test_split) == 359
    assert report.accuracy >= 0.95 and judge.test_accuracy == pytest.approx(report.accuracy)
    assert len(report.per_class) == 10 and min(report.per_class) >= 0.85
    assert report.to_dict() == {"accuracy": report.accuracy, "per_class": report.per_class, "count": 359}


def test_cache_round_trip_gives_identical_predictions(judge, cache_dir, test_split, monkeypatch):
    path = cache_dir / f"digits-8px-seed0-v{JUDGE_VERSION}.safetensors"
    assert path.is_file() and not [p for p in cache_dir.iterdir() if p.name.endswith(".tmp")]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached judge should have been loaded, not trained")

    monkeypatch.setattr(Judge, "train", no_training)
    cached = Judge.for_dataset("digits", image_size=8, cache_dir=cache_dir)
    assert cached.classes == judge.classes and cached.test_accuracy == judge.test_accuracy
    assert torch.equal(cached.predict(test_split.images), judge.predict(test_split.images))


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDIFF_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "judge"
    monkeypatch.delenv("MINIDIFF_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "minidiff", "judge")


def test_random_noise_scores_low(judge):
    noise = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    report = judge.score(noise, torch.arange(200) % 10)
    assert report.accuracy < 0.3 and report.per_class.count(None) == 0


def test_predict_returns_labels_for_images(judge, test_split):
    labels = judge.predict(test_split.images[:8])
    assert labels.dtype == torch.long and labels.shape == (8,)
    report = judge.score(test_split.images[:3], [int(test_split.labels[0])] * 3)
    assert report.count == 3 and sum(acc is not None for acc in report.per_class) == 1


def test_bad_images_and_labels_are_rejected(judge):
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 1, 8, 8\), got \(4, 3, 8, 8\)"):
        judge.predict(torch.zeros(4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"got \(4, 1, 16, 16\)"):
        judge.score(torch.zeros(4, 1, 16, 16), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\], got \[-1, 10\]"):
        judge.score(torch.zeros(3, 1, 8, 8), [10, -1, 3])
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        judge.score(torch.zeros(3, 1, 8, 8), [1, 2])
    with pytest.raises(TypeError, match="labels must be integers"):
        judge.score(torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 2.0]))


def test_unknown_dataset_has_no_judge(tmp_path):
    with pytest.raises(ValueError, match="no judge for dataset 'imagenet'.*digits"):
        Judge.for_dataset("imagenet", cache_dir=tmp_path)


def _tiny_judge(seed):
    return Judge.train(Subset(Digits(8, split="test"), range(64)), epochs=1, seed=seed)


def test_training_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    first, again, other = _tiny_judge(0), _tiny_judge(0), _tiny_judge(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = [judge.model.head[-1].weight for judge in (first, again, other)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    assert first.classes == [str(k) for k in range(10)] and first.test_accuracy is None  # inferred from labels


def test_save_load_round_trip_and_corrupt_file(tmp_path):
    judge = _tiny_judge(0)
    judge.save(tmp_path / "judge.safetensors")
    loaded = Judge.load(tmp_path / "judge.safetensors")
    images = Digits(8, split="test").images[:32]
    assert torch.equal(loaded.predict(images), judge.predict(images))
    assert (loaded.image_size, loaded.channels, loaded.classes) == (8, 1, judge.classes)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="bad.safetensors: not a readable judge file"):
        Judge.load(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        Judge.load(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------- captioned shapes
def test_captioned_shapes_hold_out_three_pairs():
    from minidiff.data import HELD_OUT_PAIRS, CaptionedShapes

    train = CaptionedShapes(16, "train", 30)
    held = CaptionedShapes(16, "held_out", 6)
    assert len(train.pairs) == 15 and not set(train.pairs) & set(HELD_OUT_PAIRS)
    assert {held.pair(i) for i in range(6)} == set(HELD_OUT_PAIRS)
    image, caption = train[4]
    assert image.shape == (3, 16, 16) and caption == "a yellow triangle" and -1 <= image.min() <= image.max() <= 1
    item = CaptionedShapes(16, "train", 30, size_labels=True)[4]
    assert torch.equal(item["image"], image) and item["prompts"] == caption and item["class_labels"] in (0, 1)
    with pytest.raises(ValueError, match="split must be one of"):
        CaptionedShapes(16, "test")


def test_colour_and_size_are_read_from_the_bright_pixels():
    from minidiff.data import CaptionedShapes
    from minidiff.judge import colour_names, size_names

    data = CaptionedShapes(32, "all", 180, seed=3, size_labels=True)
    items = [data[i] for i in range(180)]
    images = torch.stack([item["image"] for item in items])
    assert colour_names(images) == [item["prompts"].split()[1] for item in items]
    sizes = size_names(images, [item["prompts"].split()[2] for item in items])
    assert sum(s == ("small", "large")[item["class_labels"]] for s, item in zip(sizes, items)) >= 175
    assert colour_names(torch.full((1, 3, 8, 8), -0.8)) == [None]  # nothing bright: no colour
    with pytest.raises(ValueError, match=r"RGB images of shape \(B, 3, H, W\), got \(1, 1, 8, 8\)"):
        colour_names(torch.zeros(1, 1, 8, 8))


def test_caption_judge_scores_shape_colour_and_both():
    from minidiff.data import CaptionedShapes, ShapeLabels
    from minidiff.judge import CaptionJudge

    judge = CaptionJudge(Judge.train(ShapeLabels(CaptionedShapes(16, "all", 300)), epochs=4))
    data = CaptionedShapes(16, "all", 36, seed=1)
    images = torch.stack([data[i][0] for i in range(36)])
    right = judge.score(images, [data[i][1] for i in range(36)])
    wrong_colour = judge.score(images, [data[(i + 3) % 36][1] for i in range(36)])  # another colour, same shape
    assert right.colour == 1.0 and wrong_colour.colour == 0.0 and wrong_colour.shape == right.shape
    assert right.both == right.shape and right.count == 36
    with pytest.raises(ValueError, match="exactly one colour"):
        judge.score(images[:1], ["a circle"])
    with pytest.raises(ValueError, match="must tell"):
        CaptionJudge(Judge.train(Shapes(16, 30, kind="stripes"), epochs=1))


def test_psnr_and_high_frequency_energy():
    from minidiff.judge import high_frequency_energy, psnr

    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8  # x + 0.1 stays inside [-1, 1]
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2,), 10 * math.log10(4 / 0.01)), atol=1e-3)
    smooth = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    assert (high_frequency_energy(smooth) < high_frequency_energy(x) / 4).all()
    assert high_frequency_energy(torch.zeros(1, 3, 8, 8)).item() == 0
