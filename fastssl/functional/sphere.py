"""Placeholder: sphere family."""

def sfrik(*args, **kwargs):
    raise NotImplementedError('sfrik: not implemented yet')


def sfrik_mmd(*args, **kwargs):
    raise NotImplementedError('sfrik_mmd: not implemented yet')


def auh(*args, **kwargs):
    raise NotImplementedError('auh: not implemented yet')
