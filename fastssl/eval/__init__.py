"""Evaluation of frozen backbones: weighted k-NN (fastssl.eval.knn: knn_accuracy) and linear
probing (fastssl.eval.linear: linear_probe, PRESETS). Command lines: ``python -m
fastssl.eval.knn`` / ``python -m fastssl.eval.linear``.

The package imports neither module, so that ``python -m fastssl.eval.knn`` does not import its
own module twice (runpy warns when a package pre-imports the module it is asked to run): import
the names from the modules. The k-NN on tensors and the feature extraction that the trainer's
monitor shares are fastssl.models.knn and fastssl.models.features.
"""
