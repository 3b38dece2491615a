"""``fastssl.backends``: the implementations behind the families' backend tables.

One module per backend and family (docs/design.md, "Layers"):

* ``fastssl.backends.torch.<family>``: the PyTorch implementation (chunked, any device);
* ``fastssl.backends.ext.<family>``: the C++ / CUDA glue (calls into ``fastssl._C``);
* the Triton launches stay in ``fastssl.kernels.<family>`` (the top-level ``kernels/``).

Every entry of a family implements that family's interface (``fastssl.backends.interfaces``),
the methods it lacks being absent. ``fastssl.ops.<family>.TABLE`` maps a backend name to the
entry: the torch class itself, a :class:`LazyBackend` for the others, so that ``import fastssl``
loads neither ``triton`` nor ``fastssl._C``.
"""
from __future__ import annotations

import importlib


class LazyBackend:
    """A table entry that imports its implementation (``module.attr``) at the first call.

    Its methods are known without the import (`methods`, the interface methods the
    implementation defines; a test checks that they are exactly those), so choosing a backend
    by what it implements never imports triton or fastssl._C."""

    def __init__(self, module: str, attr: str, methods: tuple[str, ...]):
        self.module, self.attr, self.methods = module, attr, tuple(methods)
        self._impl = None
        for name in self.methods:
            setattr(self, name, self._method(name))

    def load(self):
        """The implementation class (its module imported on the first use)."""
        if self._impl is None:
            self._impl = getattr(importlib.import_module(self.module), self.attr)
        return self._impl

    def _method(self, name: str):
        def call(*args, **kwargs):
            return getattr(self.load(), name)(*args, **kwargs)
        call.__name__ = name
        return call

    def __repr__(self) -> str:
        return f"LazyBackend({self.module}.{self.attr})"
