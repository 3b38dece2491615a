"""ResNet backbones (torchvision names), projector/predictor MLPs and backbone checkpoints."""
from fastssl.models.backbone import backbone_state_dict, build_backbone, load_backbone
from fastssl.models.heads import MLP
from fastssl.models.resnet import ARCHS, BasicBlock, Bottleneck, ResNet, resnet18, resnet50

__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "MLP", "ResNet", "backbone_state_dict",
           "build_backbone", "load_backbone", "resnet18", "resnet50"]
