"""The UNet and its building blocks."""
from .unet import UNet

__all__ = ["UNet"]
