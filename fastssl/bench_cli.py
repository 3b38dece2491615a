"""``fastssl-bench``: the benchmark suite (``python -m bench`` in a checkout), reachable from an
installed wheel.

The wheel installs the repository's ``bench/`` folder as ``fastssl.bench`` (no top-level
``bench`` module in site-packages). Its modules import each other as ``bench.*``, as in a
checkout, so this entry point lets ``bench`` name that package in its own process only (and
its isolated worker processes run this module again). Installed runs write their results under
``./fastssl-bench-results`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import importlib
import os
import sys


def main(argv: list[str] | None = None) -> int:
    try:
        package = importlib.import_module("fastssl.bench")
    except ImportError:  # a checkout: bench/ is a top-level folder next to fastssl/
        package = importlib.import_module("bench")
    else:
        sys.modules.setdefault("bench", package)
        os.environ.setdefault("FASTSSL_BENCH_MODULE", "fastssl.bench_cli")
    bench_main = importlib.import_module("bench.__main__").main
    return bench_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
