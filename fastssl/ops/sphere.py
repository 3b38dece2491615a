"""Placeholder: sphere ops (autograd.Function + torch.library registration + backend table)."""
