"""Datasets that yield ``(image (C, H, W) in [-1, 1], label)``: embedded ones (nothing to download), image
folders and torchvision datasets on disk; ``load_dataset`` finds any of them by name or path."""
from .embedded import (DATASET_NAMES, IMAGE_EXTENSIONS, TORCHVISION_DATASETS, Digits, ImageFolder, LabeledDataset,
                       Shapes, TorchvisionImages, load_dataset, random_translate, resize_center_crop,
                       torchvision_dataset)

__all__ = ["DATASET_NAMES", "IMAGE_EXTENSIONS", "TORCHVISION_DATASETS", "Digits", "ImageFolder", "LabeledDataset",
           "Shapes", "TorchvisionImages", "load_dataset", "random_translate", "resize_center_crop",
           "torchvision_dataset"]
