"""The UNet, its configuration and its layers: pure nn.Modules that know nothing of files, schedulers or
training."""
from .architectures import ARCHITECTURES, class_conditional_config, image_conditional_config, text_conditional_config
from .config import UNetConfig
from .unet import UNet

__all__ = ["ARCHITECTURES", "UNet", "UNetConfig", "class_conditional_config", "image_conditional_config",
           "text_conditional_config"]
