"""Noise schedules and samplers: frozen configs, pure step functions, diffusers' config names."""
from .base import (PREDICTION_TYPES, ClipSampleConfig, Generator, History, MultistepOutput, Scheduler, SchedulerConfig,
                   SchedulerOutput, randn)
from .ddim import DDIMScheduler, DDIMSchedulerConfig
from .ddpm import DDPMScheduler, DDPMSchedulerConfig
from .dpm_solver import DPMSolverMultistepScheduler, DPMSolverMultistepSchedulerConfig
from .multistep import MultistepScheduler, MultistepSchedulerConfig
from .unipc import UniPCMultistepScheduler, UniPCMultistepSchedulerConfig

__all__ = ["ClipSampleConfig", "DDIMScheduler", "DDIMSchedulerConfig", "DDPMScheduler", "DDPMSchedulerConfig",
           "DPMSolverMultistepScheduler", "DPMSolverMultistepSchedulerConfig", "Generator", "History",
           "MultistepOutput", "MultistepScheduler", "MultistepSchedulerConfig", "PREDICTION_TYPES", "Scheduler",
           "SchedulerConfig", "SchedulerOutput", "UniPCMultistepScheduler", "UniPCMultistepSchedulerConfig", "randn"]
