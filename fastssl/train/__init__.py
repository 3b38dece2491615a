"""fastssl.train: the pretraining loop, LARS, schedules, checkpoints, logging."""
from fastssl.train.config import TrainConfig, make_config
from fastssl.train.optim import LARS, build_optimizer
from fastssl.train.schedules import cosine_momentum, scale_lr, warmup_cosine


def train(cfg, **kwargs):
    from fastssl.train.loop import train as _train
    return _train(cfg, **kwargs)


def main(argv=None) -> int:
    from fastssl.train.cli import main as _main
    return _main(argv)


__all__ = ["TrainConfig", "make_config", "LARS", "build_optimizer", "cosine_momentum", "scale_lr",
           "warmup_cosine", "train", "main"]
