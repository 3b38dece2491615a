"""The import graph: `import fastssl` pulls neither torch._dynamo nor diffsort, the whole public
API works without diffsort (the `dev` extra), reference/ depends only on the validation and
distributed helpers, and no import sits inside a function to break a cycle.

The import-time figure (import fastssl minus import torch, best of 3, in fresh interpreters)
is printed (pytest -s) and recorded in docs/design.md; it is not asserted (a loaded machine
would make it flaky)."""
import ast
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "fastssl")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **env)
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, cwd=ROOT, timeout=300)


def test_import_pulls_no_dynamo_and_no_diffsort():
    res = _python("""
        import sys
        import fastssl
        bad = sorted(m for m in sys.modules if m.startswith(("torch._dynamo", "diffsort",
                                                                "triton", "torch._inductor")))
        print(repr(bad))
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", f"import fastssl loaded {res.stdout.strip()}"


def test_backend_choice_is_marked_constant_like_the_public_decorator():
    # fastssl marks the backend choice as torch.compiler.assume_constant_result would, without
    # importing torch._dynamo at import time: the public decorator must still do exactly that.
    from fastssl import _backend

    def probe():
        return 0
    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and vars(probe) == {"_dynamo_marked_constant": True}
    assert _backend._selected_name._dynamo_marked_constant is True


def test_import_time_figure():
    runs = [_python("""
        import time
        t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
        import fastssl; t2 = time.perf_counter()
        print(t1 - t0, t2 - t1)
    """) for _ in range(3)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    extra = min(float(r.stdout.split()[1]) for r in runs)
    torch_s = min(float(r.stdout.split()[0]) for r in runs)
    print(f"\nimport torch: {torch_s:.3f} s; import fastssl after torch: {extra:.3f} s (best of 3)")


_BLOCK_DIFFSORT = """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "diffsort" or name.startswith("diffsort."):
                raise ImportError("diffsort blocked for this test")
    sys.meta_path.insert(0, _Block())
"""


def test_public_api_works_without_diffsort():
    res = _python(_BLOCK_DIFFSORT + """
    import torch
    import fastssl
    from fastssl import functional, losses
    torch.manual_seed(0)
    z1, z2 = torch.randn(12, 6, requires_grad=True), torch.randn(12, 6, requires_grad=True)
    u = torch.zeros(20)
    idx = torch.arange(12)
    outs = [
        functional.nt_xent(z1, z2), functional.info_nce(z1, z2), functional.dcl(z1, z2), functional.dclw(z1, z2),
        functional.sogclr(z1, z2, idx, u), functional.sce(z1, z2, torch.randn(5, 6)),
        functional.sfrik(z1, z2), functional.sfrik_mmd(z1), functional.auh(z1, z2),
        functional.groco([z1, z2], topk_neg=4), functional.soft_sort(z1)[0].sum(),
        functional.swav([z1 @ z2.T, z2 @ z1.T]), functional.sinkhorn(z1.detach()).sum(),
        losses.NTXentLoss()(z1, z2), losses.InfoNCELoss()(z1, z2), losses.DCLLoss()(z1, z2),
        losses.DCLWLoss()(z1, z2), losses.SogCLRLoss(20)(z1, z2, idx),
        losses.SCELoss(6, queue_size=8)(z1, z2), losses.SFRIKLoss()(z1, z2),
        losses.AUHLoss()(z1, z2), losses.GroCoLoss(topk_neg=4)([z1, z2]),
        losses.SoftSortNet("odd_even", 6)(z1)[0].sum(), losses.SwAVLoss()([z1 @ z2.T, z2 @ z1.T]),
    ]
    total = sum(o.float() for o in outs)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(z1.grad).all()
    # the other references work; only the diffsort-backed ones say what they need
    fastssl.reference.nt_xent(z1, z2); fastssl.reference.sfrik(z1, z2)
    try:
        fastssl.reference.soft_sort(z1)
    except ImportError as e:
        assert "diffsort" in str(e), e
    else:
        raise AssertionError("reference.soft_sort ran without diffsort")
    assert "diffsort" not in sys.modules
    print("ok", len(outs))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[:2] == ["ok", "24"]


ALLOWED_REFERENCE_IMPORTS = {"__future__", "math", "typing", "torch", "torch.nn.functional",
                             "fastssl", "fastssl._checks", "fastssl._validation",
                             "fastssl.distributed", "fastssl._checks_dino"}
# optional dependencies loaded where they run: never to break an import cycle
ALLOWED_LAZY = {"fastssl._C", "fastssl.kernels", "diffsort", "triton"}


def _imports(path):
    tree = ast.parse(open(path).read())
    top, lazy = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            (top if node.col_offset == 0 else lazy).update(names)
    return top, lazy


@pytest.mark.parametrize("layer", ["reference", "functional", "losses", "ops"])
def test_layer_imports(layer):
    for fname in sorted(os.listdir(os.path.join(PKG, layer))):
        if not fname.endswith(".py"):
            continue
        top, lazy = _imports(os.path.join(PKG, layer, fname))
        for name in lazy:
            assert any(name == a or name.startswith(a + ".") or name.startswith("fastssl.kernels")
                       or name == "fastssl" for a in ALLOWED_LAZY), \
                f"{layer}/{fname}: import of {name} inside a function"
        if layer == "reference" and fname != "__init__.py":
            extra = {n for n in top if n not in ALLOWED_REFERENCE_IMPORTS
                     and not any(n.startswith(a + ".") for a in
                                 ("fastssl._checks", "fastssl._checks_dino", "fastssl._validation",
                                  "fastssl.distributed", "typing", "__future__"))}
            # "from fastssl import distributed" appears as fastssl.distributed
            assert extra <= {"fastssl.distributed"}, f"reference/{fname} imports {extra}"


def test_checks_module_is_a_leaf():
    top, lazy = _imports(os.path.join(PKG, "_checks.py"))
    fastssl_imports = {n for n in top if n.startswith("fastssl")}
    assert {n.split(".")[1] for n in fastssl_imports if "." in n} <= {"_validation", "distributed"}
    top, _ = _imports(os.path.join(PKG, "_validation.py"))
    assert not {n for n in top if n.startswith("fastssl")}
