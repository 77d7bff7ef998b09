"""minidiff: a small, exact, pure-PyTorch diffusion library (diffusers-compatible UNet, DDPM/DDIM, fine-tuning,
guidance and conditioning). This module only re-exports the public API of its packages."""
from .io import list_pretrained, load_pipeline, load_scheduler, load_unet, pretrained, save_pipeline, save_unet
from .kernels import optimize, restore
from .models import UNet, UNetConfig
from .sampling import ColorGuidance, LossGuide, invert, sample
from .schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from .training import TrainConfig, Trainer, train

__version__ = "0.1.0"
__all__ = ["ColorGuidance", "DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "LossGuide", "TrainConfig",
           "Trainer", "UNet", "UNetConfig", "UniPCMultistepScheduler", "invert", "list_pretrained", "load_pipeline",
           "load_scheduler", "load_unet", "optimize", "pretrained", "restore", "save_pipeline", "save_unet", "sample",
           "train"]
