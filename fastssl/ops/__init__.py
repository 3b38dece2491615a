"""fastssl.ops: one module per kernel family; each op has one dispatch point (fastssl._backend.select)."""
from fastssl.ops import contrastive, sphere, sortnet, swav  # noqa: F401
