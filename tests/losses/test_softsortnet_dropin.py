"""SoftSortNet as a true drop-in for diffsort.DiffSortNet (issue 15)."""
import importlib.metadata
import re

import pytest
import torch

from fastssl.losses import SoftSortNet

from conftest import diffsort, needs_diffsort  # diffsort optional (GPU machine)
# every test here compares with diffsort itself
pytestmark = needs_diffsort


def _readme_usage() -> str:
    """The Usage code block of diffsort's README, as installed with the package."""
    text = importlib.metadata.metadata("diffsort").get_payload()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    usage = [b for b in blocks if "DiffSortNet(" in b]
    assert usage, "diffsort's README has no DiffSortNet example"
    return usage[0]


def _run(code: str) -> dict:
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "<diffsort README>", "exec"), scope)
    return scope


def test_diffsort_readme_example_with_only_the_import_changed(capsys):
    code = _readme_usage()
    assert "from diffsort import DiffSortNet" in code
    ours = code.replace("from diffsort import DiffSortNet",
                        "from fastssl.losses import SoftSortNet as DiffSortNet")
    theirs = _run(code)
    mine = _run(ours)
    assert isinstance(mine["sorter"], SoftSortNet)
    torch.testing.assert_close(mine["sorted_vectors"], theirs["sorted_vectors"])
    torch.testing.assert_close(mine["permutation_matrices"], theirs["permutation_matrices"])
    g_mine = torch.autograd.grad(mine["sorted_vectors"][0, :3].sum(), mine["vectors"])[0]
    g_theirs = torch.autograd.grad(theirs["sorted_vectors"][0, :3].sum(), theirs["vectors"])[0]
    torch.testing.assert_close(g_mine, g_theirs, rtol=1e-5, atol=1e-6)
    printed = capsys.readouterr().out
    assert printed.count("tensor(") == 2


def test_positional_order_is_diffsorts():
    x = torch.randn(3, 5)
    # DiffSortNet(sorting_network_type, size, device, steepness, art_lambda,
    #             interpolation_type, distribution)
    args = ("odd_even", 5, "cpu", 5.0, 0.5, None, "logistic_phi")
    mine, ref = SoftSortNet(*args), diffsort.DiffSortNet(*args)
    for a, b in zip(mine(x), ref(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the failing call
    mine = SoftSortNet("odd_even", 5, device="cpu", steepness=5)
    for a, b in zip(mine(x), diffsort.DiffSortNet("odd_even", 5, device="cpu", steepness=5)(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("network", ["odd_even", "bitonic"])
@pytest.mark.parametrize("n", [2, 3, 5, 6, 8, 11, 13])
def test_attributes_match_diffsort(network, n):
    mine = SoftSortNet(network, n, "cpu", 3.0, 0.3, None, "reciprocal")
    ref = diffsort.DiffSortNet(network, n, "cpu", 3.0, 0.3, None, "reciprocal")
    for name in ("sorting_network_type", "size", "steepness", "art_lambda", "distribution"):
        assert getattr(mine, name) == getattr(ref, name), name
    assert len(mine.sorting_network) == len(ref.sorting_network)
    for layer_mine, layer_ref in zip(mine.sorting_network, ref.sorting_network):
        assert len(layer_mine) == len(layer_ref) == 4
        for a, b in zip(layer_mine, layer_ref):
            assert a.dtype == b.dtype and a.device == b.device
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.randn(4, n, dtype=torch.float64)
    for a, b in zip(mine(x), ref(x)):
        torch.testing.assert_close(a, b)


def test_device_is_honoured():
    default = SoftSortNet("bitonic", 4)
    assert default.device is None and default.sorting_network[0][0].device.type == "cpu"
    pinned = SoftSortNet("bitonic", 4, torch.device("cpu"))
    assert pinned.device == torch.device("cpu")
    assert all(t.device.type == "cpu" for layer in pinned.sorting_network for t in layer)
    pinned(torch.randn(2, 4))
    meta = SoftSortNet("bitonic", 4, "meta")
    assert meta.sorting_network[0][0].device.type == "meta"
    with pytest.raises(ValueError, match="x: expected a tensor on meta"):
        meta(torch.randn(2, 4))
    assert meta.to(torch.float64).device.type == "meta"
    assert pinned.to("cpu").device == torch.device("cpu")
    pinned._apply(lambda t: t.to("meta"))  # what .to("meta") does to the module's tensors
    assert pinned.device.type == "meta" and pinned.sorting_network[0][0].device.type == "meta"
    # a half cast moves nothing but must not touch the network's float32 matrices either way
    assert SoftSortNet("odd_even", 3).to(torch.float64).device is None


def test_errors_name_the_wrong_argument():
    with pytest.raises(ValueError, match="sorting_network_type"):
        SoftSortNet("bubble", 4)
    with pytest.raises(ValueError, match="size"):
        SoftSortNet("odd_even", 1)
    # fastssl's old order (steepness third): the error names `device`, not `distribution`
    with pytest.raises(TypeError, match="device.*third positional argument"):
        SoftSortNet("odd_even", 5, 10.0)
    with pytest.raises(ValueError, match="device"):
        SoftSortNet("odd_even", 5, "gpu0")
    with pytest.raises(ValueError, match="steepness"):
        SoftSortNet("odd_even", 5, "cpu", -1.0)
    with pytest.raises(ValueError, match="art_lambda"):
        SoftSortNet("odd_even", 5, "cpu", 1.0, -0.5)
    with pytest.raises(ValueError, match="interpolation_type"):
        SoftSortNet("odd_even", 5, "cpu", 1.0, 0.25, "laplace")
    with pytest.raises(ValueError, match="interpolation_type.*conflicts"):
        SoftSortNet("odd_even", 5, "cpu", 1.0, 0.25, "logistic", "gaussian")
    with pytest.raises(ValueError, match="distribution"):
        SoftSortNet("odd_even", 5, "cpu", 1.0, 0.25, None, "laplace")
    legacy = SoftSortNet("odd_even", 5, interpolation_type="logistic")
    assert legacy.distribution == "logistic"
