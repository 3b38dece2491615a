"""The training configuration: defaults < preset < command-line flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    method: str = "simclr"
    preset: str | None = None
    arch: str = "resnet18"
    data: str = "demo"
    backend: str = "auto"                 # the data loader (CLI --loader): dali | synthetic | auto
    dataset_size: int | None = None       # synthetic backend only
    epochs: int = 10
    batch_size: int = 64                  # global batch (split over ranks)
    optimizer: str = "lars"               # lars | larc | sgd
    base_lr: float = 0.3
    lr_scaling: str = "linear"            # linear | linear32 | sqrt | none
    lr: float | None = None               # absolute peak lr (overrides base_lr and scaling)
    start_lr_ratio: float = 0.0           # warmup starts at this fraction of the peak
    final_lr_ratio: float = 0.0           # cosine ends at this fraction of the peak
    warmup_epochs: float = 10
    weight_decay: float = 1e-6
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    exclude_1d: bool = True               # LARS: biases / norm params out of wd and adaptation
    crops: list = field(default_factory=lambda: [{"size": 32, "scale": [0.3, 1.0], "count": 2}])
    heads: dict = field(default_factory=dict)
    method_args: dict = field(default_factory=dict)
    zero_init_residual: bool = True
    amp: str = "auto"                     # auto (bf16 on GPU, off on CPU) | bf16 | fp16 | off
    channels_last: bool | None = None     # None: on for CUDA
    compile: bool = False
    sync_bn: bool = True                  # SyncBatchNorm under DDP on GPU
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: str | None = None
    trust_checkpoint: bool = False        # --resume with a full unpickle (runs code in the file)
    num_threads: int | None = None        # loader threads; None: derived from the cores per process
    log_every: int = 10
    knn_every: int = 1                    # epochs between k-NN monitor runs (0 = off)
    knn_k: int = 20
    knn_train_samples: int = 30000        # held-out labelled subset for the monitor
    eval_size: int = 224
    max_steps: int | None = None          # stop (with a checkpoint) after this many steps in total
    deterministic: bool = False
    skip_corrupt: bool = False            # DALI: skip (and report) unreadable images, else stop
    tensorboard: bool = False             # also log scalars to OUT/tensorboard (needs tensorboard)
    dist_timeout: float = 600.0           # seconds a collective may wait for the other ranks
    compare_random_init: bool = False     # demo: also print the k-NN of a random-init network

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def make_config(preset: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    values = {}
    for source, what in ((preset or {}, "preset"), (overrides or {}, "override")):
        unknown = set(source) - FIELDS
        if unknown:
            raise ValueError(f"config: unknown {what} key(s) {sorted(unknown)}")
        values.update({k: v for k, v in source.items() if v is not None})
    return TrainConfig(**values)
