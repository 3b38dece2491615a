"""One pattern for every family (docs/design.md): the backend is chosen once, by the public
function, and the op's backward runs the forward's backend, also when the backward runs on
another thread (where the use_backend context is not visible) or under another setting.

Each family's table entries are replaced by spies that record which entry's methods run."""
import inspect
import threading

import pytest
import torch
from conftest import HAS_CUDA

import fastssl
from fastssl import functional
from fastssl._backend import can_serve
from fastssl.backends import LazyBackend, interfaces
from fastssl.ops import contrastive, dino, sortnet, sphere, swav

FAMILIES = {"contrastive": contrastive, "sphere": sphere, "sortnet": sortnet, "swav": swav,
            "dino": dino}
# methods that only a backward calls
BACKWARD_METHODS = {
    "contrastive": {"lse_backward", "sce_backward", "gram_lse_backward"},
    "sphere": {"series_grad_hat", "gauss_grad_hat"},
    "sortnet": {"soft_sort_backward", "groco_rows_backward", "groco_fused_backward"},
    "swav": {"cross_entropy"},
}
# forward methods that also produce the gradient (the same-pass ops: their backward only scales it)
SAME_PASS_METHODS = {"contrastive": {"lse_sum_forward", "sce_grad_forward"},
                     "sphere": {"series_forward_grad", "gauss_forward_grad"}}


class _Spy:
    def __init__(self, name, entry, calls):
        self._name, self._entry, self._calls = name, entry, calls

    def __getattr__(self, attr):
        target = getattr(self._entry, attr)  # AttributeError where the entry lacks it
        if not callable(target):
            return target
        name, calls = self._name, self._calls

        def spied(*args, **kwargs):
            calls.append((name, attr))
            return target(*args, **kwargs)
        return spied


@pytest.fixture
def spies(monkeypatch):
    calls = []
    for module in FAMILIES.values():
        for name, entry in list(module.TABLE.items()):
            monkeypatch.setitem(module.TABLE, name, _Spy(name, entry, calls))
    return calls


def _inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(6, 5, generator=g).to(device, dtype).requires_grad_(True)
    z2 = torch.randn(6, 5, generator=g).to(device, dtype).requires_grad_(True)
    return z1, z2


LOSSES = {
    # name: (family, loss of (z1, z2), backends with an explicit backward)
    "nt_xent": ("contrastive", lambda a, b: functional.nt_xent(a, b), ("torch", "triton")),
    "dcl": ("contrastive", lambda a, b: functional.dcl(a, b), ("torch", "triton")),
    "sce": ("contrastive", lambda a, b: functional.sce(a, b.detach(), b.detach()[:3] * 0.5),
            ("torch", "triton")),
    "sfrik": ("sphere", lambda a, b: functional.sfrik(a, b), ("torch", "triton")),
    "auh": ("sphere", lambda a, b: functional.auh(a, b), ("torch", "triton")),
    "soft_sort": ("sortnet", lambda a, b: (functional.soft_sort(a)[0].sum()
                                           + functional.soft_sort(b)[1].sum()),
                  ("cpp", "triton", "cuda")),
    "groco": ("sortnet", lambda a, b: functional.groco([a, b], topk_neg=3),
              ("cpp", "triton", "cuda")),
    "swav": ("swav", lambda a, b: functional.swav([a, b]), ()),
}
BACKENDS = ("reference", "torch", "cpp", "triton", "cuda")


def _cases():
    out = []
    for loss in LOSSES:
        for backend in BACKENDS:
            for dev in ("cpu", "cuda"):
                marks = []
                if dev == "cuda" and not HAS_CUDA:
                    marks.append(pytest.mark.skip(reason="no CUDA device on this machine"))
                elif not can_serve(backend, torch.device(dev))[0]:
                    marks.append(pytest.mark.skip(reason=can_serve(backend, torch.device(dev))[1]))
                out.append(pytest.param(loss, backend, dev, marks=marks,
                                        id=f"{loss}-{backend}-{dev}"))
    return out


def _run_backward_elsewhere(loss, other):
    """loss.backward() on a new thread, under another forced backend."""
    errors = []

    def work():
        try:
            with fastssl.use_backend(other):
                loss.backward()
        except BaseException as e:  # re-raised on the test's thread
            errors.append(e)
    t = threading.Thread(target=work)
    t.start()
    t.join()
    if errors:
        raise errors[0]


@pytest.mark.parametrize("loss,backend,device", _cases())
def test_backward_runs_the_forward_backend(spies, loss, backend, device):
    family, f, explicit = LOSSES[loss]
    table = FAMILIES[family].TABLE
    z1, z2 = _inputs(device)
    with fastssl.use_backend(backend):
        try:
            out = f(z1, z2)
        except RuntimeError as e:
            if backend not in table or "no implementation" in str(e):
                pytest.skip(f"{loss} has no {backend} backend: {e}")
            raise
    forward_calls = list(spies)
    assert {name for name, _ in forward_calls} <= {backend}, forward_calls
    spies.clear()
    # The other setting: any backend that could serve this device, never the forward's.
    other = "reference" if backend != "reference" else "torch"
    _run_backward_elsewhere(out, other)
    assert z1.grad is not None and torch.isfinite(z1.grad).all()
    assert {name for name, _ in spies} <= {backend}, \
        f"backward ran {spies} after a {backend} forward"
    if backend in explicit:
        ran = {attr for _, attr in spies}
        same_pass = {attr for _, attr in forward_calls} & SAME_PASS_METHODS.get(family, set())
        assert ran & BACKWARD_METHODS[family] or same_pass, \
            f"{backend}'s backward did not run and its forward made no gradient: {spies}"


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_swav_cross_entropy_recomputed_gradient_uses_forward_backend(spies, backend):
    # When the forward ran without the closed-form gradient (compute_grad=False), the backward
    # computes it with the forward's backend, on the autograd thread.
    scores = torch.randn(4, 6, requires_grad=True)
    targets = torch.softmax(torch.randn(4, 6), dim=1)
    loss, _ = torch.ops.fastssl.swav_cross_entropy(scores, targets, 0.1, False, backend)
    spies.clear()
    _run_backward_elsewhere(loss, "torch" if backend != "torch" else "reference")
    assert spies == [(backend, "cross_entropy")]
    expected = torch.autograd.grad(
        -(targets * torch.log_softmax(scores / 0.1, dim=1)).sum(), scores)[0]
    torch.testing.assert_close(scores.grad, expected)


def test_every_family_has_one_table_shape():
    for family, module in FAMILIES.items():
        assert isinstance(module.TABLE, dict) and set(module.TABLE) <= set(BACKENDS), family
        # the reference is chosen by the public function (public_loss), never by an op
        assert "reference" not in module.TABLE and "torch" in module.TABLE, family
        assert callable(module.backend_for), family
        assert module.backend_for("x", torch.device("cpu")) in module.TABLE, family


def _params(fn, drop_self):
    params = list(inspect.signature(fn).parameters.values())[1 if drop_self else 0:]
    return [(p.name, p.kind, p.default) for p in params]


def _implementation(entry):
    """The class behind a table entry (a LazyBackend loaded now), or None where this machine
    cannot load it (no triton, or fastssl._C not built)."""
    if not isinstance(entry, LazyBackend):
        return entry
    try:
        return entry.load()
    except ImportError:
        return None


def _public_methods(impl):
    return {n for n in dir(impl) if not n.startswith("_") and callable(getattr(impl, n))}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_entry_implements_exactly_its_family_interface(family):
    interface = interfaces.INTERFACES[family]
    methods = set(interfaces.interface_methods(family))
    required = methods - interfaces.OPTIONAL[family]
    assert interfaces.OPTIONAL[family] <= methods, family
    loaded = 0
    for name, entry in FAMILIES[family].TABLE.items():
        impl = _implementation(entry)
        if isinstance(entry, LazyBackend):
            # the methods a choice can see without the import are exactly those it imports
            assert set(entry.methods) <= methods, (family, name, entry.methods)
            if impl is not None:
                assert set(entry.methods) == _public_methods(impl), (family, name)
        if impl is None:
            continue
        loaded += 1
        have = _public_methods(impl)
        assert have <= methods, f"{family}/{name}: methods outside the interface {have - methods}"
        assert required <= have, f"{family}/{name} lacks {required - have}"
        for method in have:
            assert _params(getattr(impl, method), False) == \
                _params(getattr(interface, method), True), f"{family}/{name}.{method}"
    assert loaded >= 2, family  # torch and cpp at least (the extension is built for the tests)


def test_registered_ops_refuse_the_reference():
    s = torch.randn(4, 6)
    with pytest.raises(ValueError, match="backend"):
        torch.ops.fastssl.sinkhorn(s, 0.05, 3, False, "reference")
    with pytest.raises(ValueError, match="backend"):
        torch.ops.fastssl.swav_cross_entropy(s, torch.softmax(s, 1), 0.1, True, "reference")
    with pytest.raises(ValueError, match="backend"):
        torch.ops.fastssl.contrastive_lse_sym(s, torch.arange(4), torch.arange(4), 1.0, False,
                                              False, "reference")
    with pytest.raises(ValueError, match="backend"):
        torch.ops.fastssl.sphere_series_sum(s, None, [1.0], "reference")


@pytest.mark.parametrize("loss", ["nt_xent", "sfrik", "groco", "swav", "sinkhorn"])
def test_the_reference_is_chosen_by_the_public_function(monkeypatch, loss):
    # under use_backend("reference") the public function calls the reference itself, once,
    # with its own arguments; no op and no table entry runs
    fn = getattr(functional, loss)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return torch.zeros(())
    monkeypatch.setattr(fn, "reference", spy)
    z1, z2 = _inputs("cpu")
    args = {"groco": ([z1, z2],), "swav": ([z1, z2],), "sinkhorn": (z1,)}.get(loss, (z1, z2))
    with fastssl.use_backend("reference"):
        fn(*args, gather_distributed=False)
    assert calls == [{"gather_distributed": False}]
