"""The peer libraries, where importable, for the direct comparisons of tests/compat.

lightly's losses are loaded from their submodules: ``lightly.loss``'s package init imports
torchvision (not needed by these losses; installing it could pull another torch). Install the
peers outside the venv without dependencies, e.g. ``pip install --no-deps --target DIR lightly
open_clip_torch`` and put DIR on PYTHONPATH. Absent, the comparisons skip with the reason;
the formula-level tests always run.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import pytest


def lightly_module(name: str):
    """lightly.loss.<name> (or raise pytest's skip with the reason)."""
    try:
        import lightly
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"peer lightly not importable ({type(e).__name__}: {e})")
    full = f"lightly.loss.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if "torchvision" not in str(e):
            pytest.skip(f"peer {full} not importable: {e}")
    # bypass the package inits that import torchvision: bare packages on the same folders
    for key in [k for k in sys.modules if k.startswith(("lightly.loss", "lightly.models"))]:
        del sys.modules[key]
    root = os.path.dirname(lightly.__file__)
    for pkg_name in ("loss", "models", "models.modules"):
        pkg = types.ModuleType(f"lightly.{pkg_name}")
        pkg.__path__ = [os.path.join(root, *pkg_name.split("."))]
        sys.modules[pkg.__name__] = pkg
    try:
        import lightly.models.utils  # noqa: F401  (the memory bank's gather)
    except Exception:  # noqa: BLE001
        utils = types.ModuleType("lightly.models.utils")
        sys.modules["lightly.models.utils"] = utils
    try:
        return importlib.import_module(full)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"peer {full} not importable ({type(e).__name__}: {e})")


def lightly_version() -> str:
    import lightly
    return lightly.__version__


def open_clip_loss():
    """open_clip's loss module, loaded from its file (``open_clip``'s package init imports
    torchvision and the model zoo; ``open_clip/loss.py`` needs only torch)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"peer open_clip not found ({type(e).__name__}: {e})")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("peer open_clip not installed (pip install --no-deps open_clip_torch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    loader = importlib.util.spec_from_file_location("_peer_open_clip_loss", path)
    module = importlib.util.module_from_spec(loader)
    try:
        loader.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"peer open_clip/loss.py not importable ({type(e).__name__}: {e})")
    return module


def open_clip_version() -> str:
    spec = importlib.util.find_spec("open_clip")
    path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
    scope: dict = {}
    exec(open(path).read(), scope)
    return scope["__version__"]


def diffsort_module():
    try:
        return importlib.import_module("diffsort")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"peer diffsort not importable ({type(e).__name__}: {e})")
