"""Hostile image files: 16-bit and float images are scaled by their real range, transparency is composited,
and every file that cannot be read is named in the error."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from minidiff.data import ImageFolder


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
