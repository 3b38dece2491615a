"""The floors of the training side of fastssl, and imports that only run down them.

    floor 4  train_imagenet.py, fastssl/_torchrun_worker.py   (entry scripts)
    floor 3  fastssl.train | fastssl.eval                     (siblings: neither imports the other)
    floor 2  fastssl.methods
    floor 1  fastssl.models | fastssl.data | fastssl.optim    (siblings)
    floor 0  the loss library: losses, functional, ops, kernels, reference, compat, distributed, ...

A module imports fastssl modules of its own package or of lower floors only; the loss library
imports nothing of floors 1-4. What train and eval both need sits on floor 1: the optimisers and
schedules (fastssl.optim), checkpoint files (fastssl.models.checkpoint_io), feature extraction
(fastssl.models.features) and the weighted k-NN (fastssl.models.knn).

And no fastssl module is imported inside a function in these floors (an import placed there to
break a cycle hides the cycle; optional third-party dependencies such as nvidia.dali, PIL or
matplotlib may stay local). Read from the source (AST), so nothing is imported here.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastssl")

FLOORS = {"fastssl.optim": 1, "fastssl.models": 1, "fastssl.data": 1, "fastssl.methods": 2,
          "fastssl.train": 3, "fastssl.eval": 3}
ENTRY_SCRIPTS = ("train_imagenet.py", os.path.join("fastssl", "_torchrun_worker.py"))
ENTRY_FLOOR = 4
# files held to "no fastssl import inside a function", besides every file of FLOORS
NO_LOCAL_EXTRA = ENTRY_SCRIPTS + (os.path.join("fastssl", "__init__.py"),)


def _module_name(rel: str) -> str:
    """fastssl/train/loop.py -> fastssl.train.loop; fastssl/eval/__init__.py -> fastssl.eval."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _python_files():
    """Every .py file of the fastssl package (relative paths), and the entry scripts."""
    out = []
    for dirpath, dirnames, filenames in os.walk(PKG):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        out += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in sorted(filenames)
                if f.endswith(".py")]
    return out + [p for p in ENTRY_SCRIPTS if p not in out]


def _package_of(module: str) -> str | None:
    """The FLOORS key that holds `module` (None: floor 0 or outside fastssl)."""
    for key in FLOORS:
        if module == key or module.startswith(key + "."):
            return key
    return None


def _floor(module: str) -> int:
    package = _package_of(module)
    return FLOORS[package] if package else 0


def _targets(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """The fastssl modules an import statement names (``from fastssl import distributed``
    names fastssl.distributed; relative imports are resolved against `module`)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "fastssl"]
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        if not is_package:
            anchor = anchor[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    if base.split(".")[0] != "fastssl":
        return []
    # "from package import name": name may be a submodule; an attribute stays with its module
    return [f"{base}.{a.name}" for a in node.names]


def _imports(rel: str):
    """(fastssl module names imported, [(line, what) of fastssl imports inside a function])."""
    path = os.path.join(ROOT, rel)
    tree = ast.parse(open(path).read(), filename=path)
    module = _module_name(rel) if rel.startswith("fastssl") else "__main__"
    is_package = rel.endswith("__init__.py")
    names, local = [], []

    def visit(node, in_function):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found = _targets(node, module, is_package)
            names.extend((node.lineno, t) for t in found)
            if in_function and found:
                local.append((node.lineno, ", ".join(found)))
        elif (in_function and isinstance(node, ast.Call)
              and _is_dynamic_import(node) and _names_fastssl(node.args[:1])):
            local.append((node.lineno, "a fastssl module by import_module / __import__"))
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                  ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(tree, False)
    return names, local


def _is_dynamic_import(call: ast.Call) -> bool:
    f = call.func
    return ((isinstance(f, ast.Name) and f.id in ("__import__", "import_module"))
            or (isinstance(f, ast.Attribute) and f.attr == "import_module"))


def _names_fastssl(args) -> bool:
    if not args:
        return False
    arg = args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value.split(".")[0] == "fastssl"
    if isinstance(arg, ast.JoinedStr) and arg.values:
        first = arg.values[0]
        return isinstance(first, ast.Constant) and str(first.value).startswith("fastssl")
    return True    # a computed name: it may be a fastssl module


def _floor_of_file(rel: str) -> int:
    if rel in ENTRY_SCRIPTS:
        return ENTRY_FLOOR
    return _floor(_module_name(rel))


def _resolve(target: str) -> str:
    """`target` or, when it names an attribute (from fastssl.x import name), its module."""
    parts = target.split(".")
    while parts:
        path = os.path.join(ROOT, *parts)
        if os.path.isdir(path) or os.path.isfile(path + ".py"):
            return ".".join(parts)
        parts = parts[:-1]
    return target


def test_the_floors_exist():
    for package in FLOORS:
        path = os.path.join(ROOT, *package.split("."))
        assert os.path.isdir(path) or os.path.isfile(path + ".py"), f"{package} is missing"


@pytest.mark.parametrize("rel", [f for f in _python_files()
                                 if _package_of(_module_name(f)) or f in NO_LOCAL_EXTRA])
def test_no_fastssl_import_inside_a_function(rel):
    _, local = _imports(rel)
    assert not local, (f"{rel}: fastssl imported inside a function (line: module) "
                       f"{local}: import it at the top; a cycle this breaks is a layering to fix")


@pytest.mark.parametrize("rel", _python_files())
def test_imports_run_down_the_floors(rel):
    floor = _floor_of_file(rel)
    own = _package_of(_module_name(rel)) if rel not in ENTRY_SCRIPTS else None
    names, _ = _imports(rel)
    wrong = []
    for line, target in names:
        target = _resolve(target)
        package = _package_of(target)
        if package is None or package == own:
            continue                  # the loss library (floor 0), or its own package
        if _floor(target) >= floor:
            wrong.append(f"line {line}: {target} (floor {_floor(target)})")
    assert not wrong, (f"{rel} (floor {floor}) imports from its own floor or above: {wrong}; "
                       f"what two packages of a floor share goes a floor below both")


def test_methods_and_eval_import_nothing_from_train_and_train_nothing_from_eval():
    # the rules the floors above imply, spelled out (issue 27)
    bad = []
    for rel in _python_files():
        package = _package_of(_module_name(rel))
        names = {_resolve(t) for _, t in _imports(rel)[0]}
        for forbidden_from, forbidden in (("fastssl.methods", "fastssl.train"),
                                          ("fastssl.eval", "fastssl.train"),
                                          ("fastssl.train", "fastssl.eval")):
            if package == forbidden_from:
                bad += [f"{rel}: {n}" for n in names
                        if n == forbidden or n.startswith(forbidden + ".")]
    assert not bad, bad
