"""Placeholder: contrastive family modules."""
import torch


class NTXentLoss(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError('NTXentLoss: not implemented yet')


class InfoNCELoss(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError('InfoNCELoss: not implemented yet')


class DCLLoss(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError('DCLLoss: not implemented yet')


class SogCLRLoss(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError('SogCLRLoss: not implemented yet')


class SCELoss(torch.nn.Module):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError('SCELoss: not implemented yet')
