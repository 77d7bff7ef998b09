"""Hostile image files: 16-bit and float images are scaled by their real range, transparency is composited,
and every file that cannot be read is named in the error. Also bad dataset arguments, and the measures of
minidiff.judge on images of the wrong shape."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from minidiff.data import ImageFolder, Shapes, SuperResolutionPairs, downsample, load_dataset, upsample
from minidiff.judge import frechet_distance, high_frequency_energy, image_statistics, memorization, psnr


def _folder(tmp_path, image: Image.Image, name: str = "img.png"):
    image.save(tmp_path / name)
    return ImageFolder(tmp_path, image_size=4, channels=3)


def test_a_16_bit_png_keeps_its_grey(tmp_path):
    image = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    tensor, _ = _folder(tmp_path, image)[0]
    assert tensor.abs().max() < 1e-3  # mid-grey is 0 in [-1, 1], not white


def test_a_float_tiff_in_unit_range_is_not_black(tmp_path):
    image = Image.fromarray(np.full((4, 4), 0.75, dtype=np.float32), mode="F")
    tensor, _ = _folder(tmp_path, image, "img.tif")[0]
    assert torch_close(tensor, 0.5)


def test_float_pixels_without_a_known_range_name_the_file(tmp_path):
    image = Image.fromarray(np.full((4, 4), 1e4, dtype=np.float32), mode="F")
    with pytest.raises(ValueError, match=r"img\.tif: cannot read image \(float pixels from 10000.0 to 10000.0"):
        _folder(tmp_path, image, "img.tif")[0]


def test_transparency_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half
    rgba[:, 2:, 3] = 255
    tensor, _ = _folder(tmp_path, Image.fromarray(rgba, mode="RGBA"))[0]
    assert torch_close(tensor[:, :, :2], 1.0)  # white where transparent
    assert torch_close(tensor[0, :, 2:], 1.0) and torch_close(tensor[1:, :, 2:], -1.0)  # red where opaque


def test_a_truncated_file_is_named(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "bad.png")
    (tmp_path / "bad.png").write_bytes((tmp_path / "bad.png").read_bytes()[:30])
    with pytest.raises(ValueError, match=r"bad\.png: cannot read image"):
        ImageFolder(tmp_path, image_size=4)[0]


def test_a_decompression_bomb_is_named(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64 x 64 > 2 x 100: PIL's bomb error
    with pytest.raises(ValueError, match=r"bomb\.png: cannot read image"):
        ImageFolder(tmp_path, image_size=4)[0]


def torch_close(tensor, value: float) -> bool:
    return bool((tensor - value).abs().max() < 1e-3)


# ------------------------------------------------------------------------------------ found by the issue-19 attack
def test_an_empty_dataset_name_is_refused_not_the_working_directory():
    with pytest.raises(ValueError, match=r"load_dataset: name_or_path='' is neither a dataset name"):
        load_dataset("", 8)


def test_an_index_past_the_folder_is_named(tmp_path):
    with pytest.raises(IndexError, match=r"index 5 out of range for the 1 images of"):
        _folder(tmp_path, Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)))[5]


def test_bad_dataset_sizes_are_named():
    with pytest.raises(ValueError, match=r"num_samples must be an int in \[1, 2\*\*32\), got True"):
        Shapes(8, num_samples=True)
    with pytest.raises(ValueError, match=r"SuperResolutionPairs: the base dataset is empty"):
        SuperResolutionPairs([], 2)


@pytest.mark.parametrize("fn, images, factor, error, message", [
    (downsample, np.zeros((1, 3, 8, 8)), 2, TypeError, r"images: expected a floating-point tensor, got ndarray"),
    (upsample, torch.zeros(1, 3, 4, 4), 0, ValueError, r"factor=0 must be an int >= 1"),
    (upsample, torch.zeros(1, 3, 4, 4), 1.5, ValueError, r"factor=1.5 must be an int >= 1"),
    (upsample, torch.zeros(3, 4, 4), 2, ValueError, r"images of shape \(3, 4, 4\): expected \(B, C, H, W\)"),
])
def test_bad_resampling_arguments_are_named(fn, images, factor, error, message):
    with pytest.raises(error, match=message):
        fn(images, factor)


@pytest.mark.parametrize("fn, args, message", [
    (psnr, (torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8)), r"references must have the images' shape"),
    (psnr, (torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)), r"images must be \(B, C, H, W\) images"),
    (high_frequency_energy, (torch.zeros(3, 8, 8),), r"images must be \(B, C, H, W\) images"),
    (image_statistics, (torch.zeros(2, 1, 8, 8),), r"images must be \(B, 3, H, W\) images"),
    (frechet_distance, (torch.randn(10, 3), torch.randn(10, 4)), r"frechet_distance: b must be \(N, D\) features"),
    (frechet_distance, (torch.randn(1, 3), torch.randn(10, 3)), r"frechet_distance: a must be \(N, D\) features "
                                                                r"with N >= 2"),
    (memorization, (torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4), torch.zeros(0, 3, 4, 4)),
     r"held_out_images must be \(B, C, H, W\) images with B >= 1"),
])
def test_measures_refuse_shapes_they_would_broadcast_or_fail_on(fn, args, message):
    with pytest.raises(ValueError, match=message):
        fn(*args)
