"""Placeholder: sortnet family."""

def groco(*args, **kwargs):
    raise NotImplementedError('groco: not implemented yet')


def soft_sort(*args, **kwargs):
    raise NotImplementedError('soft_sort: not implemented yet')
