"""Fine-tuning and training: the Trainer loop, its config, checkpoints and exact resume, EMA, logs and
torch.distributed."""
from .trainer import TrainConfig, Trainer, TrainResult, lr_factor, train

__all__ = ["TrainConfig", "TrainResult", "Trainer", "lr_factor", "train"]
