"""Datasets that yield ``(image (C, H, W) in [-1, 1], label)``: embedded ones (nothing to download), real
photographs, textures and faces from scikit-image, image folders and torchvision datasets on disk;
``load_dataset`` finds any of them by name or path. Conditioned data: captioned shapes (text-to-image) and
super-resolution pairs (image-conditioned)."""
from .captioned import COLOURS, HELD_OUT_PAIRS, SHAPES, SIZES, CaptionedShapes, ShapeLabels
from .catalog import DATASET_NAMES, load_dataset
from .embedded import (IMAGE_EXTENSIONS, TORCHVISION_DATASETS, Digits, ImageFolder, LabeledDataset, Shapes,
                       TorchvisionImages, random_translate, resize_center_crop, torchvision_dataset)
from .paired import SuperResolutionPairs, downsample, upsample
from .real import HELD_OUT_FRACTION, PHOTOS, REAL_DATASET_NAMES, TEXTURES, Crops, Faces, real_dataset, to_channels

__all__ = ["COLOURS", "HELD_OUT_PAIRS", "SHAPES", "SIZES", "CaptionedShapes", "ShapeLabels", "SuperResolutionPairs",
           "downsample", "upsample", "DATASET_NAMES", "HELD_OUT_FRACTION", "IMAGE_EXTENSIONS", "PHOTOS",
           "REAL_DATASET_NAMES", "TEXTURES",
           "TORCHVISION_DATASETS", "Crops", "Digits", "Faces", "ImageFolder", "LabeledDataset", "Shapes",
           "TorchvisionImages", "load_dataset", "random_translate", "real_dataset", "resize_center_crop",
           "to_channels", "torchvision_dataset"]
