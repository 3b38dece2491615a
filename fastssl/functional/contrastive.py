"""Placeholder: contrastive family."""

def nt_xent(*args, **kwargs):
    raise NotImplementedError('nt_xent: not implemented yet')


def info_nce(*args, **kwargs):
    raise NotImplementedError('info_nce: not implemented yet')


def dcl(*args, **kwargs):
    raise NotImplementedError('dcl: not implemented yet')


def sogclr(*args, **kwargs):
    raise NotImplementedError('sogclr: not implemented yet')


def sce(*args, **kwargs):
    raise NotImplementedError('sce: not implemented yet')
