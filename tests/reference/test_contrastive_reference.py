"""fastssl.reference contrastive losses against the closed forms and invariants of the specs
of the upstream formulas (SimCLR, lightly DCLLoss/DCLWLoss, SogCLR builder.py,
eztorch sce_loss.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastssl import reference as R

T = 0.1


def _same_rows(n, d=4, dtype=torch.float64):
    v = torch.randn(1, d, dtype=dtype)
    return v.repeat(n, 1)


def test_nt_xent_equal_logits_is_log_2n_minus_1():
    n = 5
    z = _same_rows(n)
    loss = R.nt_xent(z, z.clone(), temperature=T)
    torch.testing.assert_close(loss, torch.tensor(math.log(2 * n - 1), dtype=torch.float64))


def test_nt_xent_matches_simclr_two_crop_formula():
    # SFRIK's multiview_nce_loss: per crop, anchors of the other view, logits [pos | 2N-2 negs].
    n, d = 6, 5
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    a = F.normalize(torch.cat([x, y]), dim=1)
    g = a @ a.T / T
    losses = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        negs = [j for j in range(2 * n) if j not in (i, pos)]
        logits = torch.cat([g[i, pos].view(1), g[i, negs]])
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    torch.testing.assert_close(R.nt_xent(x, y, temperature=T), torch.stack(losses).mean())


def test_info_nce_equal_logits_and_symmetric_is_mean_of_directions():
    n = 4
    z = _same_rows(n)
    torch.testing.assert_close(
        R.info_nce(z, z.clone()), torch.tensor(math.log(n), dtype=torch.float64)
    )
    q, k = torch.randn(n, 3, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    sym = R.info_nce(q, k, temperature=0.2, symmetric=True)
    both = 0.5 * (R.info_nce(q, k, temperature=0.2) + R.info_nce(k, q, temperature=0.2))
    torch.testing.assert_close(sym, both)
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
    torch.testing.assert_close(R.info_nce(q, k, temperature=0.2),
                               F.cross_entropy(logits, torch.arange(n)))


def test_dcl_equal_logits_closed_form():
    # All cosines 1: -1/T + log(2(N - 1) exp(1/T)) = log(2(N - 1)): ONE log-sum-exp over the
    # 2N - 2 negatives of both views (lightly >= 1.5.21, Yeh et al. Eq. 6), not two.
    n = 5
    z = _same_rows(n)
    expected = math.log(2 * (n - 1))
    torch.testing.assert_close(R.dcl(z, z.clone(), temperature=T),
                               torch.tensor(expected, dtype=torch.float64))


def test_dcl_matches_manual_formula():
    # Per anchor: -pos + LSE(same view, own column out) + LSE(other view, positive out).
    n, d = 4, 3
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)
    base = R.dcl(x, y, temperature=T)
    a = F.normalize(torch.cat([x, y]), dim=1)
    g = a @ a.T / T
    manual = []
    for i in range(2 * n):
        own, pos = i, (i + n) % (2 * n)
        same = [j for j in range(n) if j != i % n]
        offs = 0 if i < n else n
        other = n - offs
        negatives = [offs + j for j in same] + [other + j for j in same]
        manual.append(-g[i, pos] + torch.logsumexp(g[i, negatives], 0))
        assert own != pos and len(negatives) == 2 * n - 2
    torch.testing.assert_close(base, torch.stack(manual).mean())


def test_dcl_two_rows_closed_form():
    # N = 2, x = (e1, e2), y = (e1, e2): each anchor has positive cosine 1 and negatives of
    # cosine 0 (other row, same view) and 0 (other row, other view): loss = -1/T + log 2.
    x = torch.eye(2, 3, dtype=torch.float64)
    torch.testing.assert_close(R.dcl(x, x.clone(), temperature=T),
                               torch.tensor(-1 / T + math.log(2), dtype=torch.float64))


def test_dclw_matches_lightly_formula():
    # lightly DCLWLoss: positive term times w_i = 2 - N softmax_i(<x_i, y_i> / sigma), same
    # weights in both directions, mean over the 2N anchors; equal weights give back DCL.
    n, d, sigma = 5, 4, 0.5
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    xn, yn = F.normalize(x, dim=1), F.normalize(y, dim=1)
    w = 2 - n * torch.softmax((xn * yn).sum(1) / sigma, dim=0)
    a = torch.cat([xn, yn])
    g = a @ a.T / T
    manual = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        negatives = [j for j in range(2 * n) if j not in (i, pos)]
        manual.append(-w[i % n] * g[i, pos] + torch.logsumexp(g[i, negatives], 0))
    torch.testing.assert_close(R.dclw(x, y, temperature=T, sigma=sigma),
                               torch.stack(manual).mean())
    z = _same_rows(n)  # all similarities equal: w = 1, DCLW = DCL
    torch.testing.assert_close(
        R.dclw(z, z.clone(), temperature=T), R.dcl(z, z.clone(), temperature=T)
    )
    # the weights carry no gradient (lightly detaches them)
    xg = x.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(R.dclw(xg, y, temperature=T), xg)
    wd = w.detach()
    (gm,) = torch.autograd.grad(R.dcl(xg, y, temperature=T, weight_fn=lambda o0, o1: wd), xg)
    torch.testing.assert_close(gw, gm)


def _sce_manual(q, k, queue, coeff, tq, tk):
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits_q = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / tq
    logits_k = torch.cat([torch.zeros(q.shape[0], 1, dtype=q.dtype), k @ queue.T], 1) / tk
    onehot = torch.zeros_like(logits_q)
    onehot[:, 0] = 1
    target = coeff * onehot + (1 - coeff) * logits_k.softmax(1)
    return -(target * logits_q.log_softmax(1)).sum(1).mean()


def test_sce_matches_manual_formula_and_coeff_one_is_infonce():
    n, d, kq = 4, 5, 7
    q, k = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    queue = F.normalize(torch.randn(kq, d, dtype=torch.float64), dim=1)
    torch.testing.assert_close(R.sce(q, k, queue, coeff=0.3, temperature=0.2, temperature_m=0.05),
                               _sce_manual(q, k, queue, 0.3, 0.2, 0.05))
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.T], 1) / 0.2
    torch.testing.assert_close(R.sce(q, k, queue, coeff=1.0, temperature=0.2),
                               F.cross_entropy(logits, torch.zeros(n, dtype=torch.long)))


def test_sce_equal_logits_is_log_columns():
    n, d, kq = 3, 4, 6
    q = torch.zeros(n, d, dtype=torch.float64)
    q[:, 0] = 1
    # Keys and queue orthogonal to every q: all student logits are 0.
    k = torch.randn(n, d, dtype=torch.float64)
    k[:, 0] = 0
    queue = torch.randn(kq, d, dtype=torch.float64)
    queue[:, 0] = 0
    queue = F.normalize(queue, dim=1)
    for coeff in (0.0, 0.5, 1.0):
        torch.testing.assert_close(R.sce(q, k, queue, coeff=coeff),
                                   torch.tensor(math.log(1 + kq), dtype=torch.float64))
        torch.testing.assert_close(R.sce(q, k, queue, coeff=coeff, use_keys=True),
                                   torch.tensor(math.log(n + kq), dtype=torch.float64))


def test_sce_gradients_only_to_q():
    q = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1).requires_grad_(True)
    R.sce(q, k, queue, use_keys=True).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


def _decoupled_ref(z1, z2, t):
    # spec 2.6: mean_i sum_dir [-s_pos + T log(mean over the 2(N-1) negatives of exp(s/T))]
    n = z1.shape[0]
    h = F.normalize(torch.cat([z1, z2]), dim=1)
    s = h @ h.T
    idx = torch.arange(2 * n)
    pos = (idx + n) % (2 * n)
    mask = torch.ones(2 * n, 2 * n, dtype=torch.bool)
    mask[idx, idx] = False
    mask[idx, pos] = False
    lse = torch.logsumexp((s / t).masked_fill(~mask, float("-inf")), 1)
    return (-s[idx, pos] + t * (lse - math.log(2 * (n - 1)))).sum() / n


def test_sogclr_gamma_one_gradient_is_decoupled_gradient():
    n, d, t = 5, 4, 0.2
    z1 = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    u = torch.zeros(20)
    R.sogclr(z1, z2, torch.arange(n), u, gamma=1.0, temperature=t).backward()
    g1, g2 = z1.grad.clone(), z2.grad.clone()
    z1.grad = z2.grad = None
    _decoupled_ref(z1, z2, t).backward()
    torch.testing.assert_close(g1, z1.grad)
    torch.testing.assert_close(g2, z2.grad)


def test_sogclr_equal_cosines_give_zero():
    z = _same_rows(4)
    loss = R.sogclr(z, z.clone(), torch.arange(4), torch.zeros(4), gamma=0.9)
    torch.testing.assert_close(loss, torch.zeros((), dtype=torch.float64))


def test_sogclr_u_invariants():
    n, d, t, gamma = 4, 3, 0.1, 0.6
    z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    index = torch.tensor([1, 3, 5, 7])
    u = torch.zeros(10)
    R.sogclr(z1, z2, index, u, gamma=gamma, temperature=t)
    # First visit: gamma forced to 1, u = mean of the two views' batch estimators.
    h = F.normalize(torch.cat([z1, z2]), dim=1)
    s = h @ h.T
    idx = torch.arange(2 * n)
    mask = torch.ones(2 * n, 2 * n, dtype=torch.bool)
    mask[idx, idx] = False
    mask[idx, (idx + n) % (2 * n)] = False
    g = (torch.exp(s / t) * mask).sum(1) / (2 * (n - 1))
    batch = (g[:n] + g[n:]) / 2
    torch.testing.assert_close(u[index].double(), batch, rtol=1e-6, atol=0)
    assert (u[index] >= math.exp(-1 / t)).all() and (u[index] <= math.exp(1 / t)).all()
    assert (u[[0, 2, 4, 6, 8, 9]] == 0).all()
    # Revisit: u_new = (1 - gamma) u_old + gamma * batch estimator.
    old = u.clone()
    R.sogclr(z1, z2, index, u, gamma=gamma, temperature=t)
    torch.testing.assert_close(u[index].double(), (1 - gamma) * old[index].double() + gamma * batch,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "info_nce_sym", "dcl", "dcl_weighted",
                                  "sce", "sce_keys"])
def test_reference_gradcheck(name):
    torch.manual_seed(1)
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    fns = {
        "nt_xent": lambda x, y: R.nt_xent(x, y, temperature=0.5),
        "info_nce": lambda x, y: R.info_nce(x, y, temperature=0.5),
        "info_nce_sym": lambda x, y: R.info_nce(x, y, temperature=0.5, symmetric=True),
        "dcl": lambda x, y: R.dcl(x, y, temperature=0.5),
        # DCLW's weights carry no gradient: gradcheck the weighted term with fixed weights
        "dcl_weighted": lambda x, y: R.dcl(x, y, temperature=0.5,
                                           weight_fn=lambda o0, o1: torch.tensor(
                                               [0.5, 1.0, 1.5], dtype=o0.dtype)),
        "sce": lambda x, y: R.sce(x, y.detach(), queue, temperature=0.5, temperature_m=0.3),
        "sce_keys": lambda x, y: R.sce(x, y.detach(), queue, use_keys=True),
    }
    inputs = (a, b) if not name.startswith("sce") else (a, b.detach())
    assert torch.autograd.gradcheck(fns[name], inputs)
