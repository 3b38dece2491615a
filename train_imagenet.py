"""Self-supervised ImageNet pretraining with fastssl (see --help).

    python train_imagenet.py                                   # demo: ResNet-18 on generated data
    python train_imagenet.py --data /imagenet --preset swav_800ep_bs4096
    torchrun --nproc_per_node=8 train_imagenet.py --data /imagenet --preset sce_200ep
"""
from fastssl.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
