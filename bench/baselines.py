"""What users would otherwise run, for the benchmarks: "eager" losses and the peer libraries.

"eager" is the best plain PyTorch a user would write, from the loss's formula: the full
similarity matrix and autograd, masks in place, one cross-entropy or log-sum-exp, no copies
(matmuls in the input dtype, softmax in float32 as autocast does); tests/bench/test_baselines.py
checks each against fastssl.reference (float64, value and gradient). Peers (``peer:<library>``)
come from the installed package: lightly's losses from its submodules (its package init imports
torchvision); SwAV's and lightly's Sinkhorn are written here from their published formula (exp
at the input dtype, no max subtraction: they overflow at small epsilon and in float16);
torchsort (soft_sort, values only, regularization_strength 1.0, l2: a different relaxation, so
time is compared, not the loss), recorded as skipped when its extension does not import.
"""
from __future__ import annotations

import importlib
import math
import os
import sys
import types

import torch
import torch.nn.functional as F


def _f32(x):
    # autocast runs softmax / cross-entropy in float32; float32 and float64 stay as they are.
    return x.float() if x.element_size() < 4 else x



def eager_nt_xent(z1, z2, temperature=0.1):
    """SimCLR as a careful user writes it: the 2B x 2B logits, the diagonal masked in place,
    one cross-entropy (no eye mask, no masked copy of the logits)."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = _f32((z @ z.T).div_(temperature))
    logits.fill_diagonal_(float("-inf"))
    ar = torch.arange(b, device=z.device)
    return F.cross_entropy(logits, torch.cat([ar + b, ar]))


def eager_info_nce(q, k, temperature=0.1, symmetric=False):
    """MoCo-v3 / CLIP InfoNCE over the B x B logits (both directions when symmetric)."""
    logits = _f32(F.normalize(q, dim=1) @ F.normalize(k, dim=1).T).div_(temperature)
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels)
    return 0.5 * (loss + F.cross_entropy(logits.T, labels)) if symmetric else loss


def eager_dcl(z1, z2, temperature=0.1, weights=None):
    """Decoupled contrastive loss: -w pos + log-sum-exp over the 2B - 2 negatives of each row
    of Z Z^T / T, self and positive masked in place; mean over the 2B rows."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = _f32((z @ z.T).div_(temperature))
    ar = torch.arange(2 * b, device=z.device)
    pos_col = (ar + b) % (2 * b)
    pos = logits[ar, pos_col]          # a copy: the masking below leaves it intact
    logits.fill_diagonal_(float("-inf"))
    logits[ar, pos_col] = float("-inf")
    if weights is not None:
        pos = pos * weights.repeat(2)
    return (torch.logsumexp(logits, dim=1) - pos).mean()


def eager_dclw(z1, z2, temperature=0.1, sigma=0.5):
    """DCLW: DCL with the von Mises-Fisher positive weights 2 - B softmax(<z1_i, z2_i> / sigma)."""
    with torch.no_grad():
        sim = (F.normalize(_f32(z1), dim=1) * F.normalize(_f32(z2), dim=1)).sum(1) / sigma
        w = 2 - sim.shape[0] * torch.softmax(sim, dim=0)
    return eager_dcl(z1, z2, temperature, w)


def eager_sogclr(z1, z2, index, u, gamma=0.9, temperature=0.1):
    """SogCLR: per row, the negatives' exp(s / T) weighted by the moving estimate u of their
    mean (updated in place), gradient of mean_j w_ij s_ij - s_pos; the sum over both views / B."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = _f32(z @ z.T)
    ar = torch.arange(2 * b, device=z.device)
    pos_col = (ar + b) % (2 * b)
    num_neg = 2 * (b - 1)
    with torch.no_grad():
        neg_exp = torch.exp(sim / temperature)
        neg_exp.fill_diagonal_(0)                   # self and positive masked in place
        neg_exp[ar, pos_col] = 0
        u_old = u[index].to(sim.dtype)
        g = 1.0 if bool(u_old.sum() == 0) else gamma
        u_new = (1 - g) * u_old.repeat(2) + g * neg_exp.sum(1) / num_neg
        u[index] = ((u_new[:b] + u_new[b:]) / 2).to(u.dtype)
        weights = neg_exp / u_new[:, None]
    loss = (weights * sim).sum(1) / num_neg - sim[ar, pos_col]
    return loss.sum() / b


def eager_sce(q, k, queue, coeff=0.5, temperature=0.1, temperature_m=0.07):
    """SCE (use_keys=False): target = coeff * one-hot(key) + (1 - coeff) * softmax of the key's
    similarities to the queue at temperature_m; cross-entropy with the query's log-softmax."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1).detach()
    queue = queue.detach().to(q.dtype)
    logits_q = _f32(torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1)) / temperature
    logits_k = _f32(torch.cat([torch.zeros_like(k[:, :1]), k @ queue.T], 1)) / temperature_m
    target = (1 - coeff) * torch.softmax(logits_k, dim=1)
    target[:, 0] += coeff
    return -(target * torch.log_softmax(logits_q, dim=1)).sum(1).mean()



def _gegenbauer_psi(t, weights, dim):
    # Upstream's closed forms of the normalised Gegenbauer polynomials P1..P3 on S^(dim-1).
    q = dim
    polys = (t, (1 + 1 / (q - 1)) * t**2 - 1 / (q - 1), (1 + 3 / (q - 1)) * t**3 - 3 / (q - 1) * t)
    if len(weights) > len(polys):
        raise ValueError(
            f"weights: the eager SFRIK has closed forms for 3 degrees, got {len(weights)}"
        )
    return sum(w * p for w, p in zip(weights, polys))


def _sphere_mmd(e, weights):
    return _gegenbauer_psi(_f32(e @ e.T), weights, e.shape[1]).mean()


def eager_sfrik_mmd(z, weights=(1.0, 40.0, 40.0)):
    return _sphere_mmd(F.normalize(z, dim=1), weights)


def eager_sfrik(z1, z2, weights=(1.0, 40.0, 40.0), sim_coeff=4000.0, mmd_coeff=1.0):
    x, y = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    mmd = (_sphere_mmd(x, weights) + _sphere_mmd(y, weights)) / 2
    return sim_coeff * F.mse_loss(_f32(x), _f32(y)) + mmd_coeff * mmd


def _uniformity(e, scale):
    # log mean_{i != j} exp(-2 s (1 - <e_i, e_j>)), from the off-diagonal Gram entries.
    n = e.shape[0]
    logits = _f32(e @ e.T).sub_(1).mul_(2 * scale)
    logits.fill_diagonal_(float("-inf"))
    return torch.logsumexp(logits.flatten(), 0) - math.log(n * (n - 1))


def eager_auh(z1, z2, sim_coeff=3000.0, unif_coeff=1.0, scale=2.5):
    x, y = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    unif = (_uniformity(x, scale) + _uniformity(y, scale)) / 2
    return sim_coeff * F.mse_loss(_f32(x), _f32(y)) + unif_coeff * unif



@torch.no_grad()
def swav_sinkhorn(scores, epsilon=0.05, iterations=3):
    """SwAV's distributed_sinkhorn (one process): Q = exp(scores / eps)^T in the scores' dtype,
    normalised to total mass 1, then rows to 1/K and columns to 1/B, in place; codes Q^T * B."""
    q = torch.exp(scores / epsilon).t()
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


@torch.no_grad()
def lightly_sinkhorn(scores, epsilon=0.05, iterations=3):
    """lightly's sinkhorn: as SwAV's without the uniform 1/K factor (the column normalisation
    that follows cancels it)."""
    q = torch.exp(scores / epsilon).t()
    b = q.shape[1]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def eager_swav(scores, n_assign_crops=2, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3):
    """SwAV swapped prediction: codes of each assigned crop by Sinkhorn (no gradient), predicted
    by every other crop's softmax(scores / T)."""
    log_p = [torch.log_softmax(_f32(s) / temperature, dim=1) for s in scores]
    loss = 0
    for c in range(n_assign_crops):
        codes = swav_sinkhorn(scores[c].detach(), epsilon, sinkhorn_iterations)
        others = [lp for v, lp in enumerate(log_p) if v != c]
        loss = loss + sum(-(codes * lp).sum(1).mean() for lp in others) / len(others)
    return loss / n_assign_crops


EAGER = {"nt_xent": eager_nt_xent, "info_nce": eager_info_nce, "dcl": eager_dcl, "dclw": eager_dclw,
         "sogclr": eager_sogclr, "sce": eager_sce, "sfrik": eager_sfrik,
         "sfrik_mmd": eager_sfrik_mmd, "auh": eager_auh, "sinkhorn": swav_sinkhorn,
         "swav": eager_swav}



class PeerMissing(ImportError):
    pass


def _lightly_module(name: str):
    """lightly.loss.<name> without running the package inits of lightly.loss and lightly.models
    (they import torchvision, whose wheel here does not match this torch; the losses measured
    need neither, and lightly.models.utils is only used by a non-empty memory bank)."""
    try:
        import lightly
    except Exception as e:  # noqa: BLE001
        raise PeerMissing(f"lightly is not importable ({type(e).__name__}: {e})") from None
    full = f"lightly.loss.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if "torchvision" not in str(e):
            raise PeerMissing(f"{full}: {e}") from None
    for key in [k for k in sys.modules if k.startswith(("lightly.loss", "lightly.models"))]:
        del sys.modules[key]
    root = os.path.dirname(lightly.__file__)
    for pkg_name in ("loss", "models", "models.modules"):
        pkg = types.ModuleType(f"lightly.{pkg_name}")
        pkg.__path__ = [os.path.join(root, *pkg_name.split("."))]
        sys.modules[pkg.__name__] = pkg
    sys.modules["lightly.models.utils"] = types.ModuleType("lightly.models.utils")
    try:
        return importlib.import_module(full)
    except Exception as e:  # noqa: BLE001
        raise PeerMissing(f"{full}: {type(e).__name__}: {e}") from None


def peer(op: str, name: str):
    """The peer's callable with fastssl's argument order, or raise PeerMissing."""
    if name == "lightly" and op in ("nt_xent", "dcl", "dclw"):
        mod = _lightly_module("ntx_ent_loss" if op == "nt_xent" else "dcl_loss")
        return {"nt_xent": lambda: mod.NTXentLoss(temperature=0.1),
                "dcl": lambda: mod.DCLLoss(temperature=0.1),
                "dclw": lambda: mod.DCLWLoss(temperature=0.1, sigma=0.5)}[op]()
    if name == "lightly" and op == "swav":
        loss = _lightly_module("swav_loss").SwaVLoss()
        return lambda scores, n_assign_crops=2: loss(list(scores[:n_assign_crops]),
                                                     list(scores[n_assign_crops:]))
    if name == "lightly" and op == "sinkhorn":
        try:
            fn = _lightly_module("swav_loss").sinkhorn
        except PeerMissing:
            return lightly_sinkhorn   # its formula, written here (same operations)
        return lambda s, epsilon=0.05: fn(s, iterations=3, epsilon=epsilon)
    if name == "torchsort" and op == "soft_sort":
        try:
            import torchsort
        except Exception as e:  # noqa: BLE001 - an extension built for another torch fails here
            raise PeerMissing(f"torchsort is not importable ({type(e).__name__}: {e})") from None
        # torchsort's default strength: a different parameter of a different relaxation
        return lambda x: torchsort.soft_sort(x, regularization="l2", regularization_strength=1.0)
    raise PeerMissing(f"no {name} peer for {op}")


# The peers per op ("peer:<name>"); none installable here for info_nce (lightly's NTXentLoss is
# not the two-tensor InfoNCE), sogclr, sce, sfrik, auh (upstream is not a package: eager is its
# formula) and groco (upstream is fastssl.reference). soft_sort: diffsort (values and P) and
# torchsort (values only). Sinkhorn's "eager" is SwAV's distributed_sinkhorn, what users copy.
PEERS = {"nt_xent": ("lightly",), "dcl": ("lightly",), "dclw": ("lightly",),
         "swav": ("lightly",), "sinkhorn": ("lightly",), "soft_sort": ("diffsort", "torchsort")}
