"""Noise schedules and samplers: frozen configs, pure step functions, diffusers' config names."""
from .base import PREDICTION_TYPES, Generator, Scheduler, SchedulerConfig, SchedulerOutput, randn
from .ddim import DDIMScheduler, DDIMSchedulerConfig
from .ddpm import DDPMScheduler, DDPMSchedulerConfig

__all__ = ["DDIMScheduler", "DDIMSchedulerConfig", "DDPMScheduler", "DDPMSchedulerConfig", "Generator", "PREDICTION_TYPES",
           "Scheduler", "SchedulerConfig", "SchedulerOutput", "randn"]
