"""Placeholder: sortnet ops (autograd.Function + torch.library registration + backend table)."""
