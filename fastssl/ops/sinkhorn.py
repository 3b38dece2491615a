"""Placeholder: swav ops (autograd.Function + torch.library registration + backend table)."""
