"""Reading and writing models: diffusers-format folders, and the models shipped inside minidiff."""
from .folders import load_pipeline, load_scheduler, load_state_dict, load_unet, save_pipeline, save_unet
from .shipped import list_pretrained, pretrained, pretrained_path

__all__ = ["list_pretrained", "load_pipeline", "load_scheduler", "load_state_dict", "load_unet", "pretrained",
           "pretrained_path", "save_pipeline", "save_unet"]
