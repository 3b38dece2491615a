"""fastssl.ops: one module per kernel family: its registered ops (fake kernels, autograd), its
backend table ``TABLE`` (name -> the family's interface, fastssl/backends/interfaces.py) and
``backend_for``, the family's one dispatch point (fastssl._backend.choose)."""
from fastssl.ops import contrastive, sortnet, sphere, swav  # noqa: F401
