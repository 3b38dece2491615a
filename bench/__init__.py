"""fastssl benchmark suite: every op and loss of docs/api.md against its reference and what
users would otherwise run, and the training step. ``python -m bench --help``."""
