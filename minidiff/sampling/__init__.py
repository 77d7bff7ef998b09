"""Sampling: the loop over a scheduler's timesteps, and guidance (loss guides, CLIP, classifier-free) as
wrappers of the model function."""
from .guidance import ColorGuidance, Guide, LossGuide
from .loop import classifier_free, sample

__all__ = ["ColorGuidance", "Guide", "LossGuide", "classifier_free", "sample"]
