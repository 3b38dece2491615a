"""What `auto` resolves to on CUDA tensors, per family (docs/design.md, "auto"): a backend whose
kernels the test suite has executed. The Triton kernels run in every test (interpreter); the
CUDA kernels (csrc/*_cuda.cu) are compiled and forced-backend tested but have not run on a GPU,
so no family prefers them until a GPU run (bench.backend_choice) shows them equal and faster.

No GPU needed: the resolution runs for torch.device("cuda") with `can_serve` patched."""
import pytest
import torch

from fastssl import _backend
from fastssl._backend import use_backend
from fastssl.ops import contrastive, sortnet, sphere, swav

CUDA = torch.device("cuda")

# every op name the public functions pass to backend_for, by family
OPS = {
    contrastive: ("nt_xent", "info_nce", "dcl", "dclw", "sogclr", "sce"),
    sphere: ("sfrik", "sfrik_mmd", "auh", "sphere_series_sum", "sphere_gauss_lse"),
    sortnet: ("soft_sort", "groco", "groco_rows"),
    swav: ("sinkhorn", "swav_cross_entropy", "swav"),
}


def _serving(monkeypatch, *unavailable):
    """Every backend serves CUDA tensors except those named."""
    monkeypatch.setattr(_backend, "can_serve",
                        lambda name, device: (name not in unavailable, "patched"))
    monkeypatch.delenv("FASTSSL_BACKEND", raising=False)


def _resolved(module, op):
    with use_backend("auto"):
        return module.backend_for(op, CUDA)


@pytest.mark.parametrize("module", list(OPS), ids=lambda m: m.__name__.split(".")[-1])
def test_auto_on_cuda_prefers_the_executed_triton_kernels(monkeypatch, module):
    _serving(monkeypatch)
    for op in OPS[module]:
        assert _resolved(module, op) == "triton", op


def test_the_policy_table_prefers_triton_over_cuda_in_every_family():
    for family, order in _backend.AUTO_CUDA_ORDER.items():
        assert order[0] == "triton", family
        if "cuda" in order:
            assert order.index("triton") < order.index("cuda"), family
    assert set(_backend.AUTO_CUDA_ORDER) == {"contrastive", "sphere", "sortnet", "swav"}


def test_without_triton_the_cuda_kernels_serve_and_missing_ops_take_torch(monkeypatch):
    _serving(monkeypatch, "triton")
    for op in OPS[sortnet]:
        assert _resolved(sortnet, op) == "cuda", op
    assert _resolved(swav, "sinkhorn") == "cuda"
    # "cuda" has no cross_entropy: the loss and the op take torch, never a missing entry
    assert _resolved(swav, "swav_cross_entropy") == "torch"
    assert _resolved(swav, "swav") == "torch"
    for op in OPS[contrastive]:
        assert _resolved(contrastive, op) == "torch", op


def test_each_family_follows_its_own_entry(monkeypatch):
    # A GPU run that found sortnet's CUDA kernels equal and faster would put cuda first for
    # sortnet only: swav keeps triton.
    _serving(monkeypatch)
    monkeypatch.setitem(_backend.AUTO_CUDA_ORDER, "sortnet", ("cuda", "triton", "torch"))
    assert _resolved(sortnet, "soft_sort") == "cuda"
    assert _resolved(swav, "sinkhorn") == "triton"


def test_forced_cuda_still_selects_the_cuda_kernels(monkeypatch):
    _serving(monkeypatch)
    with use_backend("cuda"):
        assert sortnet.backend_for("soft_sort", CUDA) == "cuda"
        assert swav.backend_for("sinkhorn", CUDA) == "cuda"


def test_cpu_order_unchanged(monkeypatch):
    _serving(monkeypatch)
    cpu = torch.device("cpu")
    with use_backend("auto"):
        assert sortnet.backend_for("soft_sort", cpu) == "cpp"
        assert swav.backend_for("sinkhorn", cpu) == "cpp"
        assert sphere.backend_for("sfrik", cpu) == "torch"
