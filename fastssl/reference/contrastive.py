"""Reference contrastive losses: NT-Xent (SimCLR), InfoNCE (MoCo v3 / CLIP), DCL (lightly
DCLLoss), SogCLR (Optimization-AI/SogCLR ``builder.py``), SCE (eztorch ``sce_loss.py``).

Each follows its upstream formula step by step and materialises the full similarity matrices.
Low precision follows upstream AMP: normalisation and the similarity matmul in the input dtype,
everything after the matmul (exp, log-softmax, means) in float32 (float64 for float64 inputs).

Under ``gather_distributed`` every rank computes its local rows against the gathered columns
(``fastssl.distributed.gather``, whose backward sums over ranks) and passes its share of the
global mean through ``reduce_loss``: the value is the single-process loss over the global batch,
and each rank's gradient / W is the single-process gradient of its rows (docs/api.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl import distributed as dist_utils
from fastssl._checks import (check_dcl, check_dclw, check_info_nce, check_nt_xent,
                             check_positive_weights, check_sce, check_sogclr)
from fastssl._validation import accumulation_dtype, normalize_rows

LARGE_NUM = 1e9


def _layout(x: torch.Tensor, gather_distributed: bool):
    """(use the gather?, global rows N, this rank's first row)."""
    if gather_distributed and dist_utils.is_distributed():
        b = x.shape[0]
        return True, b * dist_utils.world_size(), dist_utils.row_offset(b)
    return False, x.shape[0], 0


def nt_xent(z1, z2, temperature=0.1, *, memory_bank=None, normalize=True,
            gather_distributed=False):
    """SimCLR NT-Xent: the 2N x 2N self-masked similarity matrix, mean over the 2N anchors.
    With a memory bank (lightly's form): the N anchors are z1's rows, each with the logits
    [z1_i . z2_i | z1_i . bank] / temperature and the positive first; cross-entropy, mean.
    normalize=False: z1 and z2 used as given."""
    check_nt_xent(z1, z2, temperature, gather_distributed, memory_bank, normalize)
    acc = accumulation_dtype(z1)
    dist_on, n, off = _layout(z1, gather_distributed)
    b = z1.shape[0]
    if normalize:
        z1 = normalize_rows(z1)
        z2 = normalize_rows(z2)
    if memory_bank is not None:
        bank = memory_bank.detach().to(z1.dtype)
        logits = torch.cat([(z1 * z2).sum(1, keepdim=True), z1 @ bank.T], 1).to(acc)
        logits = logits / temperature
        zeros = torch.zeros(b, dtype=torch.long, device=z1.device)
        per_anchor = F.cross_entropy(logits, zeros, reduction="none")
        return dist_utils.reduce_loss(per_anchor.sum() / n)
    rows = torch.cat([z1, z2], 0)                                          # (2B, D) anchors
    if dist_on:
        cols = torch.cat([dist_utils.gather(z1, name="z1"), dist_utils.gather(z2, name="z2")], 0)
    else:
        cols = rows                                                        # (2N, D)
    logits = (rows @ cols.T).to(acc) / temperature                         # (2B, 2N)
    ar = torch.arange(b, device=z1.device)
    self_col = torch.cat([off + ar, n + off + ar])
    pos_col = torch.cat([n + off + ar, off + ar])
    self_mask = F.one_hot(self_col, 2 * n).bool()
    logits = logits.masked_fill(self_mask, float("-inf"))
    per_anchor = F.cross_entropy(logits, pos_col, reduction="none")
    return dist_utils.reduce_loss(per_anchor.sum() / (2 * n))


def info_nce(q, k, temperature=0.1, *, symmetric=False, normalize=True,
             gather_distributed=False):
    """InfoNCE with the positives on the diagonal of q @ k.T; symmetric averages q->k and k->q.
    normalize=False: q and k used as given."""
    check_info_nce(q, k, temperature, symmetric, gather_distributed, normalize)
    acc = accumulation_dtype(q)
    dist_on, n, off = _layout(q, gather_distributed)
    b = q.shape[0]
    if normalize:
        q = normalize_rows(q)
        k = normalize_rows(k)
    k_all = dist_utils.gather(k, name="k") if dist_on else k
    labels = torch.arange(b, device=q.device) + off
    logits_qk = (q @ k_all.T).to(acc) / temperature                       # (B, N)
    share = F.cross_entropy(logits_qk, labels, reduction="sum") / n
    if symmetric:
        q_all = dist_utils.gather(q, name="q") if dist_on else q
        logits_kq = (k @ q_all.T).to(acc) / temperature                   # (B, N)
        share_kq = F.cross_entropy(logits_kq, labels, reduction="sum") / n
        share = 0.5 * (share + share_kq)
    return dist_utils.reduce_loss(share)


def vmf_weights(out0: torch.Tensor, out1: torch.Tensor, sigma: float = 0.5, *,
                gather_distributed: bool = False) -> torch.Tensor:
    """DCLW's positive weights (lightly ``negative_mises_fisher_weights``), without gradient:
    w_i = 2 - N softmax_i(<out0_i, out1_i> / sigma), out0, out1 the normalised views and the
    softmax over the N rows of the batch. Under ``gather_distributed`` the softmax runs over
    the global batch (lightly's runs over the local rows), so that the value is the
    single-process value on the global batch (docs/api.md)."""
    acc = accumulation_dtype(out0)
    with torch.no_grad():
        sim = (out0.detach().to(acc) * out1.detach().to(acc)).sum(1) / sigma
        if gather_distributed and dist_utils.is_distributed():
            b = sim.shape[0]
            sim_all = dist_utils.gather_no_grad(sim.contiguous(), name="dclw similarities")
            off = dist_utils.row_offset(b)
            return 2 - sim_all.shape[0] * torch.softmax(sim_all, dim=0)[off:off + b]
        return 2 - sim.shape[0] * torch.softmax(sim, dim=0)


def dcl(z1, z2, temperature=0.1, *, weight_fn=None, gather_distributed=False):
    """lightly DCLLoss (>= 1.5.21) and Yeh et al. (ECCV 2022) Eq. 6: per anchor,
    -w * pos + ONE log-sum-exp over its 2N-2 negatives (same view without itself, other view
    without the positive), both directions averaged. `weight_fn(out0, out1) -> (B,)` weighs
    the positive term (None: 1), applied to the normalised local rows as lightly does."""
    check_dcl(z1, z2, temperature, weight_fn, gather_distributed)
    acc = accumulation_dtype(z1)
    dist_on, n, off = _layout(z1, gather_distributed)
    b = z1.shape[0]
    z1 = normalize_rows(z1)
    z2 = normalize_rows(z2)
    if dist_on:
        z1_all, z2_all = dist_utils.gather(z1, name="z1"), dist_utils.gather(z2, name="z2")
    else:
        z1_all, z2_all = z1, z2
    diag = F.one_hot(torch.arange(b, device=z1.device) + off, n).bool()   # (B, N) eye_rank

    def one_direction(out0, out1, out0_all, out1_all):
        sim_00 = (out0 @ out0_all.T).to(acc) / temperature
        sim_01 = (out0 @ out1_all.T).to(acc) / temperature
        positive = -sim_01[diag]
        if weight_fn is not None:
            positive = positive * check_positive_weights(weight_fn(out0, out1), b, out0).to(acc)
        negatives = torch.cat([sim_00[~diag].view(b, -1), sim_01[~diag].view(b, -1)], dim=1)
        return (positive + torch.logsumexp(negatives, dim=1)).sum()

    total = one_direction(z1, z2, z1_all, z2_all) + one_direction(z2, z1, z2_all, z1_all)
    return dist_utils.reduce_loss(total / (2 * n))


def dclw(z1, z2, temperature=0.1, *, sigma=0.5, gather_distributed=False):
    """lightly DCLWLoss: :func:`dcl` with the von Mises-Fisher weights :func:`vmf_weights`."""
    check_dclw(z1, z2, temperature, sigma, gather_distributed)

    def weight_fn(out0, out1):
        return vmf_weights(out0, out1, sigma, gather_distributed=gather_distributed)

    return dcl(z1, z2, temperature, weight_fn=weight_fn, gather_distributed=gather_distributed)


def sogclr(z1, z2, index, u, *, gamma=0.9, temperature=0.1, gather_distributed=False):
    """SogCLR dynamic contrastive loss (``dynamic_contrastive_loss``), u updated in place."""
    index = check_sogclr(z1, z2, index, u, gamma, temperature, gather_distributed)
    acc = accumulation_dtype(z1)
    dist_on, n, off = _layout(z1, gather_distributed)
    b = z1.shape[0]
    t = temperature
    hidden1 = normalize_rows(z1)
    hidden2 = normalize_rows(z2)
    if dist_on:
        hidden1_large = dist_utils.gather(hidden1, name="z1")
        hidden2_large = dist_utils.gather(hidden2, name="z2")
    else:
        hidden1_large, hidden2_large = hidden1, hidden2
    labels_idx = torch.arange(b, device=z1.device) + off
    labels = F.one_hot(labels_idx, 2 * n).to(acc)
    masks = F.one_hot(labels_idx, n).to(acc)

    # Raw cosine logits (not divided by T); self-similarity pushed to -1e9.
    logits_aa = (hidden1 @ hidden1_large.T).to(acc) - masks * LARGE_NUM
    logits_bb = (hidden2 @ hidden2_large.T).to(acc) - masks * LARGE_NUM
    logits_ab = (hidden1 @ hidden2_large.T).to(acc)
    logits_ba = (hidden2 @ hidden1_large.T).to(acc)

    neg_mask = 1 - labels
    logits_ab_aa = torch.cat([logits_ab, logits_aa], 1)
    logits_ba_bb = torch.cat([logits_ba, logits_bb], 1)
    neg_logits1 = torch.exp(logits_ab_aa / t) * neg_mask
    neg_logits2 = torch.exp(logits_ba_bb / t) * neg_mask

    num_neg = 2 * (n - 1)
    with torch.no_grad():
        u_old = u[index].to(acc)
        # First visit of the whole (local) batch: the estimator starts from the batch mean.
        g = torch.where(u_old.sum() == 0, torch.ones((), dtype=acc, device=u.device),
                        torch.full((), gamma, dtype=acc, device=u.device))
    u1 = (1 - g) * u_old + g * neg_logits1.sum(1).detach() / num_neg
    u2 = (1 - g) * u_old + g * neg_logits2.sum(1).detach() / num_neg

    with torch.no_grad():
        index_all = dist_utils.gather_no_grad(index, name="index") if dist_on else index
        u1_all = dist_utils.gather_no_grad(u1, name="u1") if dist_on else u1
        u2_all = dist_utils.gather_no_grad(u2, name="u2") if dist_on else u2
        u[index_all] = ((u1_all + u2_all) / 2).to(u.dtype)

    p_neg_weights1 = (neg_logits1 / u1[:, None]).detach()
    p_neg_weights2 = (neg_logits2 / u2[:, None]).detach()

    pos1 = (logits_ab_aa * labels).sum(1)
    pos2 = (logits_ba_bb * labels).sum(1)
    loss_a = -(pos1 - (p_neg_weights1 * logits_ab_aa).sum(1) / num_neg)
    loss_b = -(pos2 - (p_neg_weights2 * logits_ba_bb).sum(1) / num_neg)
    return dist_utils.reduce_loss((loss_a + loss_b).sum() / n)


def sce(q, k, queue, *, coeff=0.5, temperature=0.1, temperature_m=0.07, use_keys=False,
        gather_distributed=False):
    """eztorch ``compute_sce_loss``: target = L1-normalise(coeff*onehot + (1-coeff)*softmax of
    the key similarities at temperature_m); loss = cross-entropy with the query log-softmax."""
    queue = check_sce(q, k, queue, coeff, temperature, temperature_m, use_keys,
                                gather_distributed)
    acc = accumulation_dtype(q)
    dist_on, n, off = _layout(q, gather_distributed)
    b = q.shape[0]
    q = normalize_rows(q)
    k = normalize_rows(k).detach()
    k_global = dist_utils.gather_no_grad(k, name="k") if dist_on else k
    num_neg = 0 if queue is None else queue.shape[0]

    if use_keys:
        labels = torch.arange(b, device=q.device) + off
        mask = F.one_hot(labels, n + num_neg).to(acc)
        sim_k_kglobal = (k @ k_global.T).to(acc)
        sim_q_kglobal = (q @ k_global.T).to(acc)
    else:
        labels = torch.zeros(b, dtype=torch.long, device=q.device)
        mask = F.one_hot(labels, 1 + num_neg).to(acc)
        sim_q_kglobal = (q * k).sum(-1, keepdim=True).to(acc)
        sim_k_kglobal = torch.zeros(b, 1, dtype=acc, device=q.device)

    if queue is not None:
        queue_t = queue.detach().to(q.dtype)                              # (K, D)
        logits_k = torch.cat([sim_k_kglobal, (k @ queue_t.T).to(acc)], 1)
        logits_q = torch.cat([sim_q_kglobal, (q @ queue_t.T).to(acc)], 1)
    else:
        logits_k, logits_q = sim_k_kglobal, sim_q_kglobal

    if use_keys:
        logits_k = logits_k - LARGE_NUM * mask
    logits_q = logits_q / temperature
    logits_k = logits_k / temperature_m

    prob_k = F.softmax(logits_k, dim=1)
    prob_q = F.normalize(coeff * mask + (1 - coeff) * prob_k, p=1, dim=1)
    loss = -(prob_q * F.log_softmax(logits_q, dim=1)).sum(1)
    return dist_utils.reduce_loss(loss.sum() / n)
