"""Input checks found missing by probing the public API (issue 12, items 3, 4 and 6): each test
here fails on the code before the fix."""
import math

import pytest
import torch

import fastssl
from fastssl import functional
from fastssl import losses as L
from fastssl import reference as R


def _pair(n=6, d=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


# ---- item 3: SogCLR's index and u --------------------------------------------------------

@pytest.mark.parametrize("impl", [functional.sogclr, R.sogclr])
@pytest.mark.parametrize("check_finite", [False, True])
def test_sogclr_index_out_of_range_or_negative_is_named(impl, check_finite):
    z1, z2 = _pair()
    fastssl.set_check_finite(check_finite)
    try:
        for bad in ([0, 1, 2, 3, 4, 10], [0, 1, 2, 3, 4, -1]):
            u = torch.zeros(10)
            with pytest.raises(ValueError, match=r"index: expected entries in \[0, 10\)"):
                impl(z1, z2, torch.tensor(bad), u)
            assert (u == 0).all()  # nothing written (a negative index used to wrap to u[-1])
    finally:
        fastssl.set_check_finite(False)


@pytest.mark.parametrize("impl", [functional.sogclr, R.sogclr])
def test_sogclr_uint8_index_refused(impl):
    z1, z2 = _pair()
    with pytest.raises(TypeError, match="index: expected dtype int64"):
        impl(z1, z2, torch.arange(6, dtype=torch.uint8), torch.zeros(10))
    with pytest.raises(TypeError, match="index"):
        impl(z1, z2, torch.ones(6, dtype=torch.bool), torch.zeros(10))


@pytest.mark.parametrize("impl", [functional.sogclr, R.sogclr])
def test_sogclr_u_must_be_float32_and_writable(impl):
    z1, z2 = _pair()
    idx = torch.arange(6)
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="u: expected dtype float32"):
            impl(z1, z2, idx, torch.zeros(10, dtype=dtype))
    with pytest.raises(ValueError, match="u: .*stride 0"):
        impl(z1, z2, idx, torch.zeros(1).expand(10))


def test_sogclr_valid_index_still_matches_reference():
    z1, z2 = _pair()
    idx = torch.tensor([9, 0, 3, 4, 7, 2], dtype=torch.int32)
    u1, u2 = torch.zeros(10), torch.zeros(10)
    torch.testing.assert_close(functional.sogclr(z1, z2, idx, u1), R.sogclr(z1, z2, idx, u2))
    torch.testing.assert_close(u1, u2)


def test_check_index_has_no_unused_argument():
    import inspect

    from fastssl._checks import check_index
    assert "num_samples" not in inspect.signature(check_index).parameters
    assert "size" in inspect.signature(check_index).parameters


# ---- item 4: one flag check everywhere -------------------------------------------------------

def _flag_calls():
    z1, z2 = _pair()
    return {
        "sfrik": lambda v: functional.sfrik(z1, z2, gather_distributed=v),
        "sfrik_mmd": lambda v: functional.sfrik_mmd(z1, gather_distributed=v),
        "auh": lambda v: functional.auh(z1, z2, gather_distributed=v),
        "swav": lambda v: functional.swav([z1, z2], gather_distributed=v),
        "sinkhorn": lambda v: functional.sinkhorn(z1, gather_distributed=v),
        "groco": lambda v: functional.groco([z1, z2], topk_neg=3, gather_distributed=v),
        "nt_xent": lambda v: functional.nt_xent(z1, z2, gather_distributed=v),
        "dcl": lambda v: functional.dcl(z1, z2, gather_distributed=v),
        "dclw": lambda v: functional.dclw(z1, z2, gather_distributed=v),
        "ref_sfrik": lambda v: R.sfrik(z1, z2, gather_distributed=v),
        "ref_auh": lambda v: R.auh(z1, z2, gather_distributed=v),
        "ref_swav": lambda v: R.swav([z1, z2], gather_distributed=v),
        "ref_groco": lambda v: R.groco([z1, z2], topk_neg=3, gather_distributed=v),
        "SFRIKLoss": lambda v: L.SFRIKLoss(gather_distributed=v),
        "AUHLoss": lambda v: L.AUHLoss(gather_distributed=v),
        "SwAVLoss": lambda v: L.SwAVLoss(gather_distributed=v),
        "GroCoLoss": lambda v: L.GroCoLoss(gather_distributed=v),
        "NTXentLoss": lambda v: L.NTXentLoss(gather_distributed=v),
        "DCLLoss": lambda v: L.DCLLoss(gather_distributed=v),
        "DCLWLoss": lambda v: L.DCLWLoss(gather_distributed=v),
        "InfoNCELoss": lambda v: L.InfoNCELoss(gather_distributed=v),
        "SogCLRLoss": lambda v: L.SogCLRLoss(10, gather_distributed=v),
        "SCELoss": lambda v: L.SCELoss(5, gather_distributed=v),
    }


@pytest.mark.parametrize("name", list(_flag_calls()))
@pytest.mark.parametrize("value", ["no", 0, 1, None, torch.tensor(True)])
def test_gather_distributed_must_be_a_bool(name, value):
    with pytest.raises(TypeError, match="gather_distributed: expected a bool"):
        _flag_calls()[name](value)


@pytest.mark.parametrize("impl", [functional.soft_sort, R.soft_sort])
def test_soft_sort_return_permutation_must_be_a_bool(impl):
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="return_permutation: expected a bool"):
        impl(x, return_permutation="no")
    assert impl(x, return_permutation=False)[1] is None


def test_module_flags_are_checked():
    with pytest.raises(TypeError, match="symmetric"):
        L.InfoNCELoss(symmetric="no")
    with pytest.raises(TypeError, match="use_keys"):
        L.SCELoss(5, use_keys="yes")


@pytest.mark.parametrize("impl", [functional.soft_sort, R.soft_sort])
@pytest.mark.parametrize("art_lambda", [math.nan, math.inf, -0.25, "0.25"])
def test_soft_sort_art_lambda_range(impl, art_lambda):
    x = torch.randn(3, 4)
    err = TypeError if isinstance(art_lambda, str) else ValueError
    with pytest.raises(err, match="art_lambda"):
        impl(x, distribution="logistic_phi", art_lambda=art_lambda)
    with pytest.raises(err, match="art_lambda"):
        L.SoftSortNet("odd_even", 4, distribution="logistic_phi", art_lambda=art_lambda)


def test_soft_sort_art_lambda_zero_is_finite():
    y, P = functional.soft_sort(torch.randn(3, 4), distribution="logistic_phi", art_lambda=0.0)
    assert torch.isfinite(y).all() and torch.isfinite(P).all()


# ---- issue 22, point 7: every index dtype docs/api.md lists works -----------------------------

@pytest.mark.parametrize("impl", [functional.sogclr, R.sogclr])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_sogclr_every_listed_index_dtype_matches_int64(impl, dtype):
    """docs/api.md: index is int64/int32/int16/int8 (int8/int16 raised a raw IndexError)."""
    z1, z2 = _pair()
    index = torch.tensor([7, 2, 9, 0, 4, 5])
    u_want, u_got = torch.rand(10), None
    u_got = u_want.clone()
    want = impl(z1, z2, index, u_want)
    got = impl(z1, z2, index.to(dtype), u_got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(u_got, u_want, rtol=0, atol=0)


# ---- issue 22, point 10: set_check_finite covers what the loss computes from -------------------

@pytest.mark.parametrize("impl", [functional.dcl, R.dcl])
def test_check_finite_catches_a_nan_from_weight_fn(impl):
    z1, z2 = _pair()
    bad = lambda a, b: torch.full((a.shape[0],), math.nan, dtype=a.dtype)  # noqa: E731
    fastssl.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match=r"^weight_fn: returned non-finite"):
            impl(z1, z2, weight_fn=bad)
    finally:
        fastssl.set_check_finite(False)
    assert torch.isnan(impl(z1, z2, weight_fn=bad))  # off: no sync, the NaN comes through


@pytest.mark.parametrize("impl", [functional.sogclr, R.sogclr])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_check_finite_catches_a_non_finite_u(impl, value):
    z1, z2 = _pair()
    u = torch.zeros(10)
    u[3] = value
    fastssl.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match=r"^u: contains non-finite"):
            impl(z1, z2, torch.arange(6), u)
    finally:
        fastssl.set_check_finite(False)
