"""Triton kernels, one file per kernel family. Installed as ``fastssl.kernels``.

Import them as ``fastssl.kernels.<family>``; they import triton, so only the ops that run on the
triton backend load them.
"""
