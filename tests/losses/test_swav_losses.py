"""SwAV loss: functional.swav and SwAVLoss against fastssl.reference (values, gradients), the
queue (fill, FIFO, use once full, rescoring with the current prototypes), the trainer helpers."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import backend_params

import fastssl
from fastssl import functional
from fastssl import reference as R
from fastssl.functional.swav import freeze_prototypes_grad, normalize_prototypes_
from fastssl.losses import SwAVLoss
from fastssl.testing import assert_close, assert_lowp_rule


def _crops(n_crops, B, K, dtype=torch.float32, seed=0, scale=1.0, device="cpu"):
    # drawn on the CPU (same values on every device), then moved to the parametrised device
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(K, 8, generator=g, dtype=torch.float64), dim=1)
    out = []
    for _ in range(n_crops):
        z = F.normalize(torch.randn(B, 8, generator=g, dtype=torch.float64), dim=1)
        out.append((scale * z @ protos.T).to(dtype).to(device).requires_grad_(True))
    return out


def _value_and_grads(fn, views, **kw):
    loss = fn(views, **kw)
    # an assigned crop that no other assigned crop predicts gets no gradient (n_assign_crops=1)
    grads = torch.autograd.grad(loss, views, allow_unused=True)
    return loss.detach(), [torch.zeros_like(v) if g is None else g for v, g in zip(views, grads)]


@pytest.mark.parametrize("backend,device", backend_params("reference", "torch", "cpp", "triton"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_crops,n_assign", [(2, 2), (4, 2), (3, 1), (5, 3)])
def test_values_and_gradients_match_reference(backend, device, dtype, n_crops, n_assign):
    views = _crops(n_crops, 6, 10, dtype=dtype, device=device)
    kw = dict(n_assign_crops=n_assign, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3)
    ref_v, ref_g = _value_and_grads(R.swav, views, **kw)
    with fastssl.use_backend(backend):
        v, g = _value_and_grads(functional.swav, views, **kw)
    assert v.dtype == dtype and v.dim() == 0
    assert_close(v, ref_v)
    for a, b in zip(g, ref_g):
        assert a.dtype == dtype
        assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_queue_scores_match_reference(backend):
    views = _crops(3, 4, 7, dtype=torch.float64)
    queue = [t.detach() for t in _crops(2, 8, 7, dtype=torch.float64, seed=5)]
    ref_v, ref_g = _value_and_grads(R.swav, views, queue_scores=queue)
    with fastssl.use_backend(backend):
        v, g = _value_and_grads(functional.swav, views, queue_scores=queue)
    assert_close(v, ref_v)
    for a, b in zip(g, ref_g):
        assert_close(a, b)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradcheck_float64(backend):
    # codes are stop-gradient (upstream): finite differences through the assigned crop would
    # see Sinkhorn move, so check the gradient of the predicting crops with the codes fixed
    views = _crops(3, 3, 5, dtype=torch.float64)
    with fastssl.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda a, b: functional.swav([views[0].detach(), a, b], n_assign_crops=1),
            tuple(views[1:]),
        )


def test_cpp_forward_keeps_one_target_and_no_gradient_per_crop():
    # the forward saves for backward only the crops' scores, the codes and one summed target
    # (shared by the crops past the assigned ones); the gradient is recomputed in backward
    views = _crops(8, 16, 40)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with fastssl.use_backend("cpp"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = functional.swav(views, n_assign_crops=2)
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() == 16 * 40}
    inputs = {v.untyped_storage().data_ptr() for v in views}
    assert len(big - inputs) <= 3, len(big - inputs)  # 2 codes + 1 summed target
    ref_v, ref_g = _value_and_grads(R.swav, views, n_assign_crops=2)
    # retain_graph: the in-place scaling of the recomputed gradient leaves the graph intact
    g1 = torch.autograd.grad(loss, views, retain_graph=True)
    g2 = torch.autograd.grad(loss, views)
    assert_close(loss.detach(), ref_v)
    for a, b, c in zip(g1, g2, ref_g):
        assert torch.equal(a, b)
        assert_close(a, c)


def test_uniform_scores_give_log_k():
    views = [torch.zeros(4, 3000) for _ in range(3)]
    assert abs(functional.swav(views).item() - math.log(3000)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype):
    # eps = 0.05 overflows the float16 reference (Sinkhorn's exp); fastssl computes in float32
    views = _crops(4, 8, 12, dtype=dtype)
    loss = functional.swav(views)
    grads = torch.autograd.grad(loss, views)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    high = [v.detach().double().requires_grad_(True) for v in views]
    ref_v, ref_g = _value_and_grads(R.swav, high)
    # float32 arithmetic on the exact low-precision values: close to float64
    assert_close(loss.double(), ref_v, dtype=torch.float32)
    for g, rg in zip(grads, ref_g):
        # the only low-precision error left is rounding the gradient to the input dtype
        assert_lowp_rule(g.double(), rg.to(dtype).double(), rg, factor=1.0)


def test_module_without_queue_equals_functional():
    views = _crops(4, 5, 9)
    loss = SwAVLoss(temperature=0.2, epsilon=0.03, sinkhorn_iterations=2, n_assign_crops=2)
    assert_close(
        loss(views), functional.swav(views, temperature=0.2, epsilon=0.03, sinkhorn_iterations=2)
    )
    assert len(loss.state_dict()) == 2  # queue, queue_count (empty queue)


def _queue_step_data(step, B=4, D=8, K=6, n_crops=3):
    g = torch.Generator().manual_seed(100 + step)
    emb = [
        F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
        for _ in range(n_crops)
    ]
    protos = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    scores = [(e @ protos.T).requires_grad_(True) for e in emb]
    return emb, protos, scores


def test_queue_fills_fifo_used_once_full_rescored():
    B, L = 4, 8  # the queue holds two batches
    loss_fn = SwAVLoss(queue_length=L, n_assign_crops=2)
    history = []
    for step in range(4):
        emb, protos, scores = _queue_step_data(step)
        before = loss_fn.queue.clone()
        value = loss_fn(scores, embeddings=emb, prototypes=protos)
        if step < 2:
            # not full before this step: the plain loss
            assert_close(value, R.swav(scores))
        else:
            # full: the queue as it was before this step, scored with this step's prototypes
            queue_scores = [before[i] @ protos.T for i in range(2)]
            assert_close(value, R.swav(scores, queue_scores=queue_scores))
        history.append(emb)
        # FIFO: newest batch first, then the previous one
        for i in range(2):
            assert_close(loss_fn.queue[i, :B], emb[i])
            if step >= 1:
                assert_close(loss_fn.queue[i, B:2 * B], history[-2][i])
        assert int(loss_fn.queue_count) == min((step + 1) * B, L)
    assert loss_fn.queue.shape == (2, L, 8) and loss_fn.queue_full


def test_queue_embeddings_as_one_crop_major_tensor_and_linear_prototypes():
    emb, protos, scores = _queue_step_data(0)
    layer = torch.nn.Linear(8, 6, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(protos)
    a, b = SwAVLoss(queue_length=4), SwAVLoss(queue_length=4)
    for _ in range(2):
        va = a(scores, embeddings=torch.cat(emb), prototypes=layer)
        vb = b(scores, embeddings=emb, prototypes=protos)
        assert_close(va, vb)
    assert_close(a.queue, b.queue)


def test_queue_state_dict_roundtrip():
    src = SwAVLoss(queue_length=8)
    for step in range(3):
        emb, protos, scores = _queue_step_data(step)
        src(scores, embeddings=emb, prototypes=protos)
    dst = SwAVLoss(queue_length=8)
    dst.load_state_dict(src.state_dict())
    assert dst.queue_full and torch.equal(dst.queue, src.queue)
    emb, protos, scores = _queue_step_data(3)
    assert_close(dst(scores, embeddings=emb, prototypes=protos),
                 src(scores, embeddings=emb, prototypes=protos))
    dst.reset_queue()
    assert not dst.queue_full and int(dst.queue_count) == 0


def test_queue_errors():
    emb, protos, scores = _queue_step_data(0)
    with pytest.raises(ValueError, match="embeddings"):
        SwAVLoss(queue_length=8)(scores)
    with pytest.raises(ValueError, match="queue_length"):
        SwAVLoss(queue_length=2)(scores, embeddings=emb)
    # issue 12 item 6: prototypes are required from the FIRST call with a queue, not only once
    # the queue is full (the old code accepted this call and failed steps later)
    full = SwAVLoss(queue_length=4)
    with pytest.raises(ValueError, match="prototypes: required"):
        full(scores, embeddings=emb)
    assert int(full.queue_count) == 0  # nothing was pushed by the refused call
    full(scores, embeddings=emb, prototypes=protos)
    with pytest.raises(ValueError, match="prototypes"):
        full(scores, embeddings=emb)
    with pytest.raises(ValueError, match="prototypes"):
        full(scores, embeddings=emb, prototypes=protos[:, :5])
    with pytest.raises(ValueError, match="prototypes"):
        SwAVLoss(queue_length=4)(scores, embeddings=emb, prototypes=protos[:, :5])


def test_normalize_prototypes_in_place():
    layer = torch.nn.Linear(8, 5, bias=False)
    w = layer.weight
    out = normalize_prototypes_(layer)
    assert out is layer and layer.weight is w and w.requires_grad
    assert_close(w.detach().norm(dim=1), torch.ones(5))
    t = torch.randn(3, 4, dtype=torch.float64)
    normalize_prototypes_(t)
    assert_close(t.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_freeze_prototypes_grad():
    model = torch.nn.Module()
    model.head = torch.nn.Linear(4, 4)
    model.prototypes = torch.nn.Linear(4, 3, bias=False)
    out = model.prototypes(model.head(torch.randn(2, 4))).sum()
    out.backward()
    assert freeze_prototypes_grad(model, iteration=0, freeze_iters=2)
    assert model.prototypes.weight.grad is None and model.head.weight.grad is not None
    model.prototypes(torch.randn(2, 4)).sum().backward()
    assert not freeze_prototypes_grad(model, iteration=2, freeze_iters=2)
    assert model.prototypes.weight.grad is not None
    bare = torch.nn.Linear(4, 3)
    bare(torch.randn(2, 4)).sum().backward()
    assert freeze_prototypes_grad(bare, 0, 1) and bare.weight.grad is None


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda v: functional.swav(v[:1]), ValueError, "scores"),
        (lambda v: functional.swav(v[0]), TypeError, "scores"),
        (lambda v: functional.swav([v[0], v[1][:3]]), ValueError, "scores"),
        (lambda v: functional.swav([v[0], v[1].double()]), TypeError, "scores"),
        (lambda v: functional.swav(v, n_assign_crops=4), ValueError, "n_assign_crops"),
        (lambda v: functional.swav(v, n_assign_crops=0), ValueError, "n_assign_crops"),
        (lambda v: functional.swav(v, temperature=0.0), ValueError, "temperature"),
        (lambda v: functional.swav(v, epsilon=-1.0), ValueError, "epsilon"),
        (lambda v: functional.swav(v, sinkhorn_iterations=-1), ValueError, "sinkhorn_iterations"),
        (
            lambda v: functional.swav(v, queue_scores=[torch.randn(4, 10)]),
            ValueError,
            "queue_scores",
        ),
        (
            lambda v: functional.swav(v, queue_scores=[torch.randn(4, 9)] * 2),
            ValueError,
            "queue_scores",
        ),
        (lambda v: functional.swav(v, queue_scores=torch.randn(4, 10)), TypeError, "queue_scores"),
        (lambda v: SwAVLoss(temperature=-1), ValueError, "temperature"),
        (lambda v: SwAVLoss(queue_length=-1), ValueError, "queue_length"),
        (lambda v: SwAVLoss(n_assign_crops=3)(v[:2]), ValueError, "n_assign_crops"),
    ],
)
def test_bad_inputs(call, exc, match):
    views = [torch.randn(5, 10) for _ in range(3)]
    with pytest.raises(exc, match=match):
        call(views)
