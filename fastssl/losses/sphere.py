"""Placeholder: sphere family modules."""
import torch


class SFRIKLoss(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError('SFRIKLoss: not implemented yet')


class AUHLoss(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError('AUHLoss: not implemented yet')
