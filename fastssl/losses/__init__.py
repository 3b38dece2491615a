"""fastssl.losses: nn.Module wrappers (hyperparameters in __init__, state as buffers)."""
from fastssl.losses.contrastive import (NTXentLoss, InfoNCELoss, DCLLoss, DCLWLoss, SogCLRLoss,
                                        SCELoss)
from fastssl.losses.sphere import SFRIKLoss, AUHLoss
from fastssl.losses.sortnet import GroCoLoss, SoftSortNet
from fastssl.losses.swav import SwAVLoss
from fastssl.losses.dino import DINOLoss, IBOTPatchLoss, KoLeoLoss

__all__ = ['NTXentLoss', 'InfoNCELoss', 'DCLLoss', 'DCLWLoss', 'SogCLRLoss', 'SCELoss',
           'SFRIKLoss', 'AUHLoss', 'GroCoLoss', 'SoftSortNet', 'SwAVLoss', 'DINOLoss',
           'IBOTPatchLoss', 'KoLeoLoss']
