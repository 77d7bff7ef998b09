"""Every dataset by name: ``load_dataset("digits" | "shapes" | "stripes" | "faces" | "photos" | "textures" |
torchvision names | an image folder, image_size, ...)``."""
from __future__ import annotations

import os
from pathlib import Path

from .embedded import TORCHVISION_DATASETS, Digits, ImageFolder, LabeledDataset, Shapes, torchvision_dataset
from .real import REAL_DATASET_NAMES, real_dataset

DATASET_NAMES = ("digits", *Shapes.KINDS, *REAL_DATASET_NAMES, *TORCHVISION_DATASETS)


def load_dataset(name_or_path: str | os.PathLike, image_size: int, **kwargs) -> LabeledDataset:
    """A dataset by name (see ``DATASET_NAMES``; torchvision ones need ``root=``) or an image folder path."""
    name = str(name_or_path)
    if not name:
        raise ValueError(f"load_dataset: name_or_path='' is neither a dataset name ({', '.join(DATASET_NAMES)}) nor a "
                         "folder path")
    if name == "digits":
        return Digits(image_size, **kwargs)
    if name in Shapes.KINDS:
        return Shapes(image_size, kind=name, **kwargs)
    if name in REAL_DATASET_NAMES:
        return real_dataset(name, image_size, **kwargs)
    if name in TORCHVISION_DATASETS:
        if "root" not in kwargs:
            raise ValueError(f"load_dataset({name!r}) needs root=<folder where {name} was downloaded>")
        return torchvision_dataset(name, image_size=image_size, **kwargs)
    if isinstance(name_or_path, os.PathLike) or os.sep in name or Path(name).is_dir():
        return ImageFolder(name, image_size, **kwargs)
    raise ValueError(f"unknown dataset {name!r}; allowed: {DATASET_NAMES} or an image folder path")
