"""The PyTorch backend of every family (``TABLE["torch"]``; ``cpp`` reuses parts of it)."""
