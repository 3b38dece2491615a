"""fastssl.train: the pretraining loop, its checkpoint and resume policy, the k-NN monitor,
logging and the command line (LARS and the schedules are fastssl.optim's, named here too)."""
from fastssl.optim import LARS, build_optimizer, cosine_momentum, scale_lr, warmup_cosine
from fastssl.train.cli import main
from fastssl.train.config import TrainConfig, make_config
from fastssl.train.loop import train

__all__ = ["TrainConfig", "make_config", "LARS", "build_optimizer", "cosine_momentum", "scale_lr",
           "warmup_cosine", "train", "main"]
