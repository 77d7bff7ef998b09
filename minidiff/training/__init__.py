"""Fine-tuning and training: the Trainer loop, its config, checkpoints and exact resume, EMA, logs and
torch.distributed."""
from .config import LR_SCHEDULES, MIXED_PRECISION, TrainConfig, lr_factor
from .trainer import Trainer, TrainResult, train

__all__ = ["LR_SCHEDULES", "MIXED_PRECISION", "TrainConfig", "TrainResult", "Trainer", "lr_factor", "train"]
