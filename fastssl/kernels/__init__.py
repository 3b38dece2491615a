"""``fastssl.kernels``: the Triton kernels, kept in the repository's top-level ``kernels/`` folder.

An installed wheel maps that folder here (setup.py ``package_dir``). In a source checkout (and
an editable install) this shim points the package's search path at that folder instead.
"""
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_src = _os.path.join(_os.path.dirname(_os.path.dirname(_here)), "kernels")
if _os.path.isdir(_src) and _src not in __path__:
    __path__.append(_src)
