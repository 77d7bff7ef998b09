"""Sampling: the loop over a scheduler's timesteps, guidance (loss guides, CLIP, classifier-free) as
wrappers of the model function, and editing (DDIM inversion, img2img, inpainting)."""
from .denoiser import classifier_free
from .editing import invert
from .guidance import ColorGuidance, Guide, LossGuide
from .loop import sample

__all__ = ["ColorGuidance", "Guide", "LossGuide", "classifier_free", "invert", "sample"]
