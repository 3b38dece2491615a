"""fastssl benchmark suite: every op and loss of docs/api.md against its reference, and the
training step.

Run from the repository root:
``python -m bench [--op NAME] [--device cpu|cuda] [--quick] [--out DIR]``.
"""
