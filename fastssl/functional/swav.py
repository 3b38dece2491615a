"""Placeholder: swav family."""

def sinkhorn(*args, **kwargs):
    raise NotImplementedError('sinkhorn: not implemented yet')


def swav(*args, **kwargs):
    raise NotImplementedError('swav: not implemented yet')
