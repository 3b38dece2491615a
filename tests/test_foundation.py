"""The foundation: backend selection, validation helpers, the extension, the CUDA sources."""
import os

import pytest
import torch

import fastssl
from fastssl import _backend
from fastssl import _validation as V

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_imports():
    from fastssl import _C
    assert _C.with_cuda() in (True, False)
    assert isinstance(_C.with_openmp(), bool)


def test_kernels_package_is_fastssl_kernels():
    import fastssl.kernels as k
    assert any(p.endswith("kernels") for p in k.__path__)


def test_use_backend_context_and_env(monkeypatch):
    monkeypatch.delenv("FASTSSL_BACKEND", raising=False)
    assert fastssl.current_backend() == "auto"
    with fastssl.use_backend("reference"):
        assert fastssl.current_backend() == "reference"
        with fastssl.use_backend("torch"):
            assert fastssl.current_backend() == "torch"
        assert fastssl.current_backend() == "reference"
    monkeypatch.setenv("FASTSSL_BACKEND", "cpp")
    assert fastssl.current_backend() == "cpp"
    monkeypatch.setenv("FASTSSL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="FASTSSL_BACKEND"):
        fastssl.current_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend"):
        with fastssl.use_backend("gpu"):
            pass


def test_choose_auto_and_forced():
    table = {"torch": object(), "reference": object(), "cpp": object()}
    cpu = torch.device("cpu")
    with fastssl.use_backend("auto"):
        assert _backend.choose("op", cpu, table) == "cpp"
    with fastssl.use_backend("reference"):
        assert _backend.choose("op", cpu, table) == "reference"
    with fastssl.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="no implementation"):
            _backend.choose("op", cpu, table)
    with fastssl.use_backend("cuda"):
        with pytest.raises(RuntimeError, match="cannot serve cpu"):
            _backend.choose("op", cpu, dict(table, cuda=object()))


def test_validation_messages_name_the_argument():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="z1: expected a torch.Tensor"):
        V.check_embeddings("z1", [1, 2])
    with pytest.raises(ValueError, match=r"z1: expected a 2-D tensor, got shape \(4,\)"):
        V.check_embeddings("z1", torch.randn(4))
    with pytest.raises(TypeError, match="z1: expected dtype"):
        V.check_embeddings("z1", torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="z1: expected at least 1 row"):
        V.check_embeddings("z1", torch.randn(0, 3))
    with pytest.raises(ValueError, match=r"z2: expected the shape of z1 \(4, 3\), got \(5, 3\)"):
        V.check_pair("z1", x, "z2", torch.randn(5, 3))
    with pytest.raises(TypeError, match="z2: expected dtype torch.float32"):
        V.check_pair("z1", x, "z2", x.double())
    with pytest.raises(ValueError, match="temperature: expected a finite number > 0, got 0"):
        V.check_positive("temperature", 0)
    with pytest.raises(ValueError, match="network: expected one of"):
        V.check_choice("network", "bubble", ("odd_even", "bitonic"))
    with pytest.raises(ValueError, match=r"gamma: expected a value in \(0.0, 1.0\]"):
        V.check_range("gamma", 0.0, 0.0, 1.0, lo_open=True)


def test_check_finite_switch():
    bad = torch.tensor([[1.0, float("nan")]])
    V.check_embeddings("z", bad)  # off by default: no device sync
    fastssl.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match="z: contains non-finite"):
            V.check_embeddings("z", bad)
    finally:
        fastssl.set_check_finite(False)


def test_lowp_rule_helper():
    from fastssl.testing import assert_lowp_rule
    ref = torch.randn(100, dtype=torch.float64)
    lowp = ref.to(torch.bfloat16).double()
    assert_lowp_rule(lowp, lowp, ref)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_lowp_rule(ref + 1.0, lowp, ref)


def test_every_family_traces_with_fullgraph():
    """A step calling one loss of each family compiles without graph breaks (docs/api.md)."""
    from fastssl.functional import groco, nt_xent, sfrik, swav

    def step(z1, z2):
        return (nt_xent(z1, z2) + groco([z1, z2], topk_neg=4) + sfrik(z1, z2)
                + swav([z1 @ z2.T, z2 @ z1.T]))

    torch.manual_seed(0)
    z1 = torch.randn(8, 16, requires_grad=True)
    z2 = torch.randn(8, 16, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(z1, z2)
    (g1, g2) = torch.autograd.grad(out, (z1, z2))
    ref = step(z1, z2)
    (r1, r2) = torch.autograd.grad(ref, (z1, z2))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g1, r1)
    torch.testing.assert_close(g2, r2)
