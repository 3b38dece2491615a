"""``fastssl-bench``: the benchmark suite (``python -m bench`` in a checkout), reachable from an
installed wheel.

The wheel installs the repository's ``bench/`` folder as the package ``fastssl.bench`` (its
modules import each other relatively, so the same files work as ``bench`` in a checkout and as
``fastssl.bench`` installed; no top-level ``bench`` module in site-packages). Installed runs
write their results under ``./fastssl-bench-results`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import importlib.util

if importlib.util.find_spec("fastssl.bench") is not None:
    from fastssl.bench.__main__ import main
else:  # a checkout: bench/ is a top-level folder next to fastssl/
    from bench.__main__ import main

__all__ = ["main"]

if __name__ == "__main__":
    raise SystemExit(main())
