"""Evaluation of frozen backbones: weighted k-NN (fastssl.eval.knn) and linear probing
(fastssl.eval.linear). Command lines: ``python -m fastssl.eval.knn`` / ``fastssl.eval.linear``.

The names are loaded lazily so that ``python -m fastssl.eval.knn`` does not import its own
module twice (runpy warns when a package pre-imports the module it is asked to run).
"""
import importlib

_EXPORTS = {
    "extract_features": "knn", "knn_accuracy": "knn", "knn_eval_features": "knn",
    "knn_predict": "knn", "topk_correct": "knn",
    "PRESETS": "linear", "LinearPreset": "linear", "linear_probe": "linear",
    "train_linear_on_features": "linear",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"fastssl.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'fastssl.eval' has no attribute {name!r}")


def __dir__():
    return __all__
