"""Data: augmentation recipes, DALI (CPU or GPU) and synthetic training loaders, evaluation
loaders and the generated demo dataset."""
from fastssl.data.crops import (CropSpec, byol_recipe, expand_views, multicrop_recipe, recipe_for,
                                simclr_recipe, sogclr_recipe)
from fastssl.data.dali import IMAGENET_MEAN, IMAGENET_STD, dali_available
from fastssl.data.demo import DEMO_CLASSES, demo_dataset
from fastssl.data.folder import CorruptImageError, scan_image_folder
from fastssl.data.loaders import (Batch, DaliTrainLoader, EvalLoader, SyntheticTrainLoader,
                                  TrainLoader, build_eval_loader, build_train_loader)

__all__ = ["Batch", "CorruptImageError", "CropSpec", "DEMO_CLASSES", "DaliTrainLoader",
           "EvalLoader", "IMAGENET_MEAN", "IMAGENET_STD", "SyntheticTrainLoader", "TrainLoader",
           "build_eval_loader", "build_train_loader", "byol_recipe", "dali_available",
           "demo_dataset", "expand_views", "multicrop_recipe", "recipe_for", "scan_image_folder",
           "simclr_recipe", "sogclr_recipe"]
