"""minidiff: a small, exact, pure-PyTorch diffusion library (diffusers-compatible UNet, DDPM/DDIM,
fine-tuning, guidance and conditioning). This module only re-exports the public API."""
from .config import UNetConfig
from .io import load_pipeline, load_scheduler, load_unet, save_pipeline
from . import guidance
from .models import UNet
from .optimize import optimize
from .pretrained import list_pretrained, pretrained
from .sampling import sample
from .schedulers import DDIMScheduler, DDPMScheduler
from .training import TrainConfig, Trainer, train

__version__ = "0.1.0"
__all__ = ["UNet", "UNetConfig", "DDPMScheduler", "DDIMScheduler", "sample", "load_unet", "load_scheduler",
           "load_pipeline", "save_pipeline", "guidance", "list_pretrained", "pretrained",
           "TrainConfig", "Trainer", "train", "optimize"]
