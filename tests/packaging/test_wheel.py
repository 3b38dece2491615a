"""The package as users install it (issue 15): one wheel built from a clean copy of the checkout
(`pip wheel --no-build-isolation --no-deps`, which compiles fastssl._C: a few minutes), its
metadata, entry points and files, and the entry points run from the unpacked wheel, outside
the checkout. Cheap checks of pyproject.toml and of the torch-mismatch warning come first."""
import email
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

import fastssl

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"fastssl-train": "fastssl.train.cli:main", "fastssl-eval-knn": "fastssl.eval.knn:main",
           "fastssl-eval-linear": "fastssl.eval.linear:main",
           "fastssl-bench": "fastssl.bench.__main__:main"}
# setup.py's extras before the move to pyproject.toml, unchanged
EXTRAS = {"dev": ["pytest>=7", "pytest-timeout", "diffsort==0.2.0", "numpy", "matplotlib",
                  "pillow", "ruff>=0.6", "triton>=3.0; platform_system == 'Linux'"],
          "dali": ["nvidia-dali-cuda130"]}


def _pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_pyproject_metadata():
    project = _pyproject()["project"]
    assert project["name"] == "fastssl"
    assert project["optional-dependencies"] == EXTRAS
    assert project["scripts"] == SCRIPTS
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    assert project["requires-python"] == ">=3.10" and project["readme"] == "README.md"
    assert set(project["urls"]) >= {"Homepage", "Source", "Documentation", "Changelog"}
    for name in ("LICENSE", "CHANGELOG.md", "fastssl/py.typed"):
        assert (ROOT / name).is_file(), name
    assert "BSD 3-Clause" in (ROOT / "LICENSE").read_text()
    assert f"[{fastssl.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_entry_points_resolve(script):
    module, func = SCRIPTS[script].split(":")
    if module.startswith("fastssl.bench") and importlib.util.find_spec("fastssl.bench") is None:
        module = module[len("fastssl."):]   # a checkout: bench/ is installed as fastssl.bench
    assert callable(getattr(importlib.import_module(module), func))


def test_import_warns_when_another_torch_is_loaded(monkeypatch):
    assert fastssl._check_build_torch(torch.__version__, torch.__version__) is None
    message = fastssl._check_build_torch("2.4.0+cu121", torch.__version__)
    assert "2.4.0+cu121" in message and torch.__version__ in message
    fake = type(sys)("fastssl._build_info")
    fake.TORCH_VERSION = "2.4.0+cu121"
    monkeypatch.setitem(sys.modules, "fastssl._build_info", fake)
    # a built checkout has imported the real one already: `from fastssl import _build_info`
    # reads the package attribute first
    monkeypatch.setattr(fastssl, "_build_info", fake, raising=False)
    with pytest.warns(RuntimeWarning, match=r"built against torch 2\.4\.0\+cu121"):
        fastssl._warn_if_other_torch()
    fake.TORCH_VERSION = torch.__version__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastssl._warn_if_other_torch()


# ---------------------------------------------------------------------------------------------
# The wheel (one build)


def _clean_copy(dest: Path) -> None:
    """The files a clean checkout has: tracked and not-ignored files (git), else a filtered
    copy; never a build output (fastssl/_C*.so, build/, *.egg-info)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                              "-z"], cwd=ROOT, capture_output=True, check=True).stdout
        files = [f for f in out.decode().split("\0") if f and (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "build", "__pycache__", "runs", ".pytest_cache"}
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
                 and not p.name.endswith((".so", ".o")) and ".egg-info" not in str(p)]
    for f in files:
        if f.startswith("bench/results/"):
            continue  # large committed results; not part of the build
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    assert not list(dest.glob("fastssl/_C*.so"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheel")
    _clean_copy(src)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               FASTSSL_BUILD_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                           "--no-deps", "--no-cache-dir", str(src), "-w", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    wheels = list(out.glob("fastssl-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _dist_info(zf: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in zf.namelist() if n.endswith(".dist-info/" + name)]
    return zf.read(path).decode()


@pytest.mark.slow
def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as zf:
        meta = email.message_from_string(_dist_info(zf, "METADATA"))
    assert meta["Name"] == "fastssl" and meta["Version"] == fastssl.__version__
    assert "self-supervised" in meta["Summary"]
    assert meta["License-Expression"] == "BSD-3-Clause"
    assert "LICENSE" in meta.get_all("License-File")
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert set(urls) >= {"Homepage", "Source", "Documentation", "Changelog"}
    assert all(u.startswith("https://") for u in urls.values())
    classifiers = meta.get_all("Classifier")
    assert "Programming Language :: Python :: 3" in classifiers
    assert "Typing :: Typed" in classifiers
    assert meta["Requires-Python"] == ">=3.10"
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    requires = meta.get_all("Requires-Dist")
    assert f"torch=={major}.{minor}.*" in requires, requires
    assert any(r.startswith("diffsort==0.2.0") and 'extra == "dev"' in r for r in requires)
    assert any(r.startswith("nvidia-dali-cuda130") and 'extra == "dali"' in r for r in requires)
    assert set(meta.get_all("Provides-Extra")) == {"dev", "dali"}
    assert meta["Description-Content-Type"] == "text/markdown"
    assert "## Quickstart" in meta.get_payload()


@pytest.mark.slow
def test_wheel_files_and_entry_points(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = _dist_info(zf, "entry_points.txt")
        build_info = zf.read("fastssl/_build_info.py").decode()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fastssl", f"fastssl-{fastssl.__version__}.dist-info"}, tops  # no kernels/bench
    for required in ("fastssl/py.typed", "fastssl/kernels/contrastive.py",
                     "fastssl/bench/__main__.py", "fastssl/bench/common.py",
                     f"fastssl-{fastssl.__version__}.dist-info/licenses/LICENSE"):
        assert required in names, required
    assert any(n.startswith("fastssl/_C") and n.endswith(".so") for n in names)
    assert not any("/results/" in n for n in names)
    assert f"TORCH_VERSION = {torch.__version__!r}" in build_info
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


@pytest.mark.slow
def test_entry_points_run_from_the_unpacked_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    for script, target in SCRIPTS.items():
        module, func = target.split(":")
        code = (f"import sys; from {module} import {func} as main\n"
                f"try:\n    main(['--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)\n")
        proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code],
                              cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (script, proc.stdout[-2000:], proc.stderr[-4000:])
        assert "usage" in proc.stdout.lower(), (script, proc.stdout[-2000:])
    # fastssl came from the unpacked wheel, and no top-level bench/kernels was importable
    probe = ("import fastssl, importlib.util as u; print(fastssl.__file__); "
             "print(u.find_spec('bench'), u.find_spec('kernels'))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = proc.stdout.split("\n")
    assert lines[0].startswith(str(site)), proc.stdout + proc.stderr
    assert lines[1] == "None None", proc.stdout
