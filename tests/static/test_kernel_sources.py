"""GPU-only hazards checked without a GPU: 64-bit address arithmetic in every Triton kernel,
every launch under the tensor's CUDA device, the CUDA sources as setup.py builds them, and the
launchers' argument checks."""
import ast
import contextlib
import os
import re
import runpy
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench import static as S  # noqa: E402
from fastssl.kernels import _launch  # noqa: E402
from fastssl.kernels import contrastive as KC, sortnet as KS, sphere as KP, swav as KW  # noqa: E402
from fastssl.kernels import dino as KD  # noqa: E402

FAMILIES = {"contrastive": KC, "sphere": KP, "swav": KW, "sortnet": KS, "dino": KD}


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


# ---- 64-bit offsets ----------------------------------------------------------------------------

def _captured():
    from fastssl.kernels._launch import static_capture
    out = []
    for family, label, dn, size, thunk in S._cases():
        with static_capture(90) as launches:
            thunk()
        out += [(family, label, dn, size, l) for l in launches]
    return out


def test_every_kernel_forms_sizes_times_indices_in_64_bits():
    findings = S.offset_rows(_captured())
    assert not findings, "\n".join(findings)


def test_offset_check_catches_a_32bit_product():
    # the check itself: rows * D in int32 (the old sphere kernel) is reported, .to(int64) is not
    import types
    src = ("import triton\nimport triton.language as tl\n"
           "@triton.jit\ndef k(x_ptr, D, B: tl.constexpr):\n"
           "    rows = tl.arange(0, B)\n"
           "    a = tl.load(x_ptr + rows[:, None] * D)\n"
           "    b = tl.load(x_ptr + rows.to(tl.int64)[:, None] * D)\n")
    path = os.path.join(ROOT, "tests", "static", "_offset_probe.py")
    mod = types.ModuleType("fastssl.kernels._offset_probe")
    mod.__file__ = path
    import inspect
    orig = inspect.getsource
    inspect.getsource = lambda m: src if m is mod else orig(m)
    try:
        found = S.offset_findings(mod, {"D"})
    finally:
        inspect.getsource = orig
    assert len(found) == 1 and "rows[:, None] * D" in found[0]


# ---- device guard ------------------------------------------------------------------------------

def test_no_kernel_is_launched_outside_the_guarded_launch():
    for name, mod in FAMILIES.items():
        tree = ast.parse(_read("kernels", f"{name}.py"))
        direct = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Call)
                  and isinstance(n.func, ast.Subscript)]
        assert not direct, f"kernels/{name}.py launches without the device guard: {direct}"


def test_every_launcher_goes_through_launch():
    seen = {f for f, *_ in _captured()}
    assert seen == set(FAMILIES)


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports cuda:1, to see which device a launch enters."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launch_enters_the_device_of_its_first_tensor(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(torch.device(dev))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    ran = []

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                ran.append((grid, entered[:]))
            return run

    x = torch.zeros(2)._make_subclass(_OnCuda1, torch.zeros(2))
    _launch.launch(FakeKernel(), (3,), 7, x, BLOCK=4)
    assert ran == [((3,), [torch.device("cuda", 1)])]
    # CPU tensors (the interpreter) need no guard
    entered.clear()
    _launch.launch(FakeKernel(), (1,), torch.zeros(2))
    assert entered == []


# ---- CUDA sources ------------------------------------------------------------------------------

def test_setup_and_the_check_share_one_flag_list_without_fast_math():
    flags = runpy.run_path(os.path.join(ROOT, "csrc", "build_flags.py"))
    assert "--use_fast_math" not in flags["NVCC_FLAGS"]
    assert {"-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"} <= \
        set(flags["NVCC_FLAGS"])
    setup = _read("setup.py")
    assert 'FLAGS["NVCC_FLAGS"]' in setup and "use_fast_math" not in setup


def test_sortnet_cuda_p_backward_is_deterministic():
    src = _read("csrc", "sortnet_cuda.cu")
    assert "atomicAdd" not in src  # n-way atomics on one address per comparator: non-deterministic


def test_sortnet_glue_checks_every_launch_and_needs_no_cusparse():
    src = _read("csrc", "sortnet_cuda_glue.cpp")
    assert "#include <ATen/cuda/CUDAContext.h>" not in src
    assert src.count("AT_DISPATCH_FLOATING_TYPES(") == src.count("C10_CUDA_KERNEL_LAUNCH_CHECK()")


def test_swav_cuda_colstats_grid_y_is_capped():
    src = _read("csrc", "swav_cuda.cu")
    launch = re.search(r"colstats_partial_kernel<T, A><<<dim3\(([^)]*)\),\s*(\w+)", src)
    assert launch and launch.group(2) == "grid_y", "grid.y must be min(n_parts, 65535)"
    assert "kMaxGridY = 65535" in src
    assert "part += gridDim.y" in src  # the blocks stride over every row block


# ---- argument checks ---------------------------------------------------------------------------

def test_contrastive_launchers_name_the_bad_argument():
    a = torch.randn(4, 8)
    idx = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="b must have 8 columns"):
        KC.lse_forward(a, torch.randn(5, 7), idx, idx, 1.0, 5, False, False, False)
    with pytest.raises(ValueError, match="self_col"):
        KC.lse_forward(a, a, idx[:3], idx, 1.0, 4, False, False, False)
    with pytest.raises(ValueError, match="split"):
        KC.lse_forward(a, a, idx, idx, 1.0, 9, False, False, False)
    with pytest.raises(TypeError, match="a must have dtype"):
        KC.lse_forward(a.double(), a.double(), idx, idx, 1.0, 4, False, False, False)
    with pytest.raises(ValueError, match="lse0"):
        e = torch.empty(0)
        KC.lse_backward(a, a, idx, idx, 1.0, 4, False, torch.zeros(3), e, e, torch.zeros(4), e, e)
    with pytest.raises(ValueError, match="k must have the 4 rows"):
        KC.sce_forward(a, torch.randn(3, 8), a, idx, 1.0, 1.0)


def test_sphere_swav_sortnet_launchers_name_the_bad_argument():
    x = torch.randn(6, 8)
    r = torch.ones(6)
    with pytest.raises(ValueError, match="rx"):
        KP.pair_forward(x, None, r[:5], None, kind=1, coef=None, num_w=1)
    with pytest.raises(ValueError, match="coef"):
        KP.pair_forward(x, None, r, None, kind=0, coef=torch.zeros(2), num_w=3)
    with pytest.raises(ValueError, match="kind"):
        KP.pair_backward(x, x, r, r, kind=2, coef=None, num_w=1)
    s = torch.randn(6, 5)
    with pytest.raises(ValueError, match="a must have shape"):
        KW.rowpass(s, 0.05, torch.zeros(4), True)
    with pytest.raises(ValueError, match="targets must have shape"):
        KW.swav_cross_entropy(s, torch.zeros(6, 4), 0.1, False)
    with pytest.raises(ValueError, match="eps"):
        KW.colstats(s, -1.0)
    net = torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="net must have shape"):
        KS.soft_sort_forward(torch.randn(2, 4), net[:3], 0, 1.0, 0.25, 1.0, False)
    with pytest.raises(TypeError, match="net must have dtype"):
        KS.soft_sort_forward(torch.randn(2, 4), net.long(), 0, 1.0, 0.25, 1.0, False)
    with pytest.raises(ValueError, match="dist"):
        KS.soft_sort_forward(torch.randn(2, 4), net, 9, 1.0, 0.25, 1.0, False)
    with pytest.raises(ValueError, match="k must be"):
        KS.groco_rows_forward(torch.randn(2, 4), 5, net, 0, 1.0, 0.25, 1.0)
    with pytest.raises(ValueError, match="grow"):
        KS.groco_rows_backward(torch.zeros(3), torch.randn(2, 4), 1, net, 0, 1.0, 0.25, 1.0)
