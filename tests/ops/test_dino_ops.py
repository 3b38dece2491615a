"""The DINO family's registered ops (fastssl/ops/dino.py) on every backend: the centered
teacher softmax and KoLeo's nearest-neighbour search, against plain formulas on the full
matrices; their registration (opcheck), torch.compile, and the named errors of bad input."""
import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params

from fastssl._backend import can_serve
from fastssl.kernels import dino as KD
from fastssl.ops import dino as ops
from fastssl.testing import assert_close

BACKENDS = backend_params("torch", "cpp", "triton")


def _teacher(B, K, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    t = (scale * torch.randn(B, K, generator=g, dtype=torch.float64)).to(dtype)
    c = 0.5 * torch.randn(K, generator=g, dtype=torch.float64)
    return t, c


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 3), (5, 37), (9, 300)])
def test_teacher_softmax_equals_formula(backend, device, dtype, shape):
    t, c = _teacher(*shape, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    got = ops.teacher_softmax(t.to(device), c.to(device, acc), 0.04, backend)
    want = torch.softmax((t.double() - c) / 0.04, dim=1)
    assert got.dtype == acc and got.shape == t.shape
    assert_close(got.cpu().double(), want, dtype=acc)
    assert_close(got.sum(1).cpu().double(), torch.ones(shape[0], dtype=torch.float64), dtype=acc)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_teacher_softmax_stable_at_small_temperatures(backend, device, dtype):
    # logits up to 30 at T = 0.02: exp(1500) overflows every dtype without the max shift
    t, c = _teacher(6, 50, dtype, seed=1, scale=10.0)
    for temp in (0.02, 0.04, 0.07):
        got = ops.teacher_softmax(t.to(device), c.to(device, torch.float32), temp, backend)
        assert torch.isfinite(got).all()
        want = torch.softmax((t.double() - c) / temp, dim=1)
        assert_close(got.cpu().double(), want, dtype=torch.float32)


def _nearest_full(x, x_all, offset):
    sims = x.double() @ x_all.double().t()
    own = torch.arange(x.shape[0])
    sims[own, own + offset] = float("-inf")
    return sims.argmax(dim=1)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("N,M,D,offset", [(2, 2, 3, 0), (7, 7, 5, 0), (5, 13, 70, 4),
                                          (40, 80, 16, 40), (33, 33, 130, 0)])
def test_nearest_neighbor_equals_full_matrix(backend, device, dtype, N, M, D, offset):
    g = torch.Generator().manual_seed(N * M + D)
    x_all = F.normalize(torch.randn(M, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    x = x_all[offset:offset + N]
    got = ops.nearest_neighbor(x.to(device), x_all.to(device), offset, backend)
    assert got.dtype == torch.int64 and got.shape == (N,)
    assert torch.equal(got.cpu(), _nearest_full(x, x_all, offset))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nearest_neighbor_first_index_among_ties(backend, device):
    # rows 1 and 3 are copies: every other row's nearest is a tie, torch.argmax's first index
    x = F.normalize(torch.tensor([[1.0, 0.2], [0.9, 0.5], [-1.0, 0.1], [0.9, 0.5]]), dim=1)
    got = ops.nearest_neighbor(x.to(device), x.to(device), 0, backend).cpu()
    assert torch.equal(got, _nearest_full(x, x, 0))
    assert got[0].item() == 1 and got[1].item() == 3 and got[3].item() == 1


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_registration_and_compile(backend):
    ok, why = can_serve(backend, torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    t, c = _teacher(4, 9, torch.float32)
    c = c.float()
    torch.library.opcheck(torch.ops.fastssl.dino_teacher_softmax.default, (t, c, 0.05, backend))
    x = F.normalize(torch.randn(6, 4), dim=1)
    torch.library.opcheck(torch.ops.fastssl.koleo_nearest.default, (x, x, 0, backend))
    f = torch.compile(lambda a, b: ops.teacher_softmax(a, b, 0.05, backend).sum()
                      + ops.nearest_neighbor(F.normalize(a, dim=1), F.normalize(a, dim=1), 0,
                                             backend).sum(), fullgraph=True, backend="eager")
    want = (torch.softmax((t - c) / 0.05, dim=1).sum()
            + _nearest_full(F.normalize(t, dim=1), F.normalize(t, dim=1), 0).sum())
    assert_close(f(t, c), want.float())


def test_bad_input_named_errors():
    t, c = _teacher(4, 9, torch.float32)
    c = c.float()
    with pytest.raises(ValueError, match="center: expected shape"):
        torch.ops.fastssl.dino_teacher_softmax(t, c[:-1], 0.05, "torch")
    with pytest.raises(ValueError, match="teacher: expected a 2-D"):
        torch.ops.fastssl.dino_teacher_softmax(t[0], c, 0.05, "torch")
    with pytest.raises(ValueError, match="backend"):
        torch.ops.fastssl.dino_teacher_softmax(t, c, 0.05, "cuda")
    x = F.normalize(torch.randn(6, 4), dim=1)
    with pytest.raises(ValueError, match="offset"):
        torch.ops.fastssl.koleo_nearest(x, x, 1, "torch")
    with pytest.raises(ValueError, match="x_all: expected 4 columns"):
        torch.ops.fastssl.koleo_nearest(x, x[:, :3], 0, "torch")
    with pytest.raises(ValueError, match="at least 2 rows"):
        torch.ops.fastssl.koleo_nearest(x[:1], x[:1], 0, "torch")
    with pytest.raises(TypeError, match="x_all"):
        torch.ops.fastssl.koleo_nearest(x, x.half(), 0, "torch")
    with pytest.raises(ValueError, match="x_all: expected device"):
        torch.ops.fastssl.koleo_nearest(x, x.to("meta"), 0, "torch")


def test_launch_configuration_fits_the_register_budget():
    """The neighbour kernel's (rows x columns) accumulator and feature tiles stay at most 16
    values per thread for every dtype and size (what bench.static compiles with 0 spills)."""
    for cc in (80, 90):
        for dtype in (torch.float32, torch.float64):
            for N in (2, 16, 17, 1024, 65536):
                for D in (3, 64, 256, 1536):
                    cfg = KD.config("nearest", dtype, N, D, cc)
                    threads = 32 * cfg["num_warps"]
                    assert cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 16 * threads
                    assert cfg["BLOCK_N"] * cfg["BLOCK_D"] <= 32 * threads
