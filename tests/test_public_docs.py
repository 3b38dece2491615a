"""Every public function and module of fastssl.functional and fastssl.losses documents its
arguments, return value, distributed behaviour and an example; docs/api.md is in the repo,
lists every public name, and names the backends of every op."""
import inspect
import os

import pytest

import fastssl
from fastssl import functional, losses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = open(os.path.join(ROOT, "docs", "api.md")).read()


@pytest.mark.parametrize("name", functional.__all__)
def test_functional_docstrings(name):
    doc = inspect.getdoc(getattr(functional, name))
    for part in ("Args:", "Returns", "Example::", "float"):
        assert part in doc, f"{name}: docstring lacks {part!r}"
    params = [p for p in inspect.signature(getattr(functional, name)).parameters]
    for p in params:
        assert p in doc, f"{name}: docstring does not describe {p!r}"
    assert "distributed" in doc
    assert f"{name}(" in API, f"docs/api.md does not list {name}"


@pytest.mark.parametrize("name", losses.__all__)
def test_module_docstrings(name):
    cls = getattr(losses, name)
    doc = inspect.getdoc(cls)
    assert "Example::" in doc and "forward(" in doc, name
    for p in inspect.signature(cls.__init__).parameters:
        if p != "self":
            assert p in doc, f"{name}: docstring does not describe {p!r}"
    assert f"{name}(" in API, f"docs/api.md does not list {name}"


def test_api_doc_has_the_backends_table_and_real_signatures():
    assert "| op (fastssl.functional) | reference | torch | cpp | triton | cuda |" in API
    assert ".forward(scores, embeddings=None, prototypes=None)" in API
    assert "dclw(z1, z2, temperature=0.1, *, sigma=0.5, gather_distributed=False)" in API
    assert os.path.exists(os.path.join(ROOT, "docs", "design.md"))


LIBRARY_LAYERS = ("fastssl/ops", "fastssl/functional", "fastssl/losses", "fastssl/reference",
                  "tests/ops", "tests/losses", "tests/reference", "tests/distributed", "docs")


def test_no_pointer_to_documents_outside_the_repo():
    # the library layers and their tests (the trainer's files are checked with their owners')
    bad = ("shared/specs", "sce_sogclr_sfrik.md", "groco_diffsort.md", "swav_dali_lars.md",
           "architecture.md", "anchors.md")
    for top in LIBRARY_LAYERS:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".py", ".md")) and f != "test_public_docs.py":
                    text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                    for b in bad:
                        assert b not in text, f"{os.path.join(dirpath, f)} points to {b}"
    assert fastssl.__doc__
