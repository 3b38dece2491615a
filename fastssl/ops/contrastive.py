"""Placeholder: contrastive ops (autograd.Function + torch.library registration + backend table)."""
