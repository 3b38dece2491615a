"""fastssl.compat: exact drop-ins for the peer libraries, one module per peer.

Each class or function takes exactly the peer's constructor signature, defaults, forward call
form, return type and exceptions, and runs on fastssl's fused ops, so that switching is one
import line and changes no number (to float rounding)::

    from fastssl.compat.lightly import NTXentLoss, DCLLoss, DCLWLoss, SwaVLoss, sinkhorn
    from fastssl.compat.diffsort import DiffSortNet
    from fastssl.compat.open_clip import ClipLoss

The modules are imported on demand (``import fastssl`` does not load them). Every docstring
names the peer version followed and any deliberate difference. fastssl's native modules
(:mod:`fastssl.losses`) keep their own signatures and defaults.
"""
__all__ = ["lightly", "diffsort", "open_clip"]
