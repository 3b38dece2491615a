"""2-process gloo training through fastssl.compat.lightly.NTXentLoss(gather_distributed=True)
with lightly's default arguments (temperature 0.5): the weights after a few DDP steps equal
those of the formula-level single-process run on the global batch (SimCLR's NT-Xent written out
on the full matrix, float64), and each rank's loss value is lightly's per-rank value (the mean
over its own rows against every rank's columns). Issue 24: fastssl's native default
temperature (0.1) gave other weights (first weight 0.3207 instead of 0.1675)."""
import pytest
import torch
import torch.nn.functional as F

from fastssl.testing import run_torchrun

pytestmark = pytest.mark.distributed

WORLD, ROWS, DIM_IN, DIM_OUT, STEPS, LR = 2, 4, 6, 5, 3, 0.5


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(DIM_IN, DIM_OUT).double()


def _batch(step):
    g = torch.Generator().manual_seed(10 + step)
    x = torch.randn(WORLD * ROWS, DIM_IN, generator=g, dtype=torch.float64)
    return x, x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def _formula_terms(out0, out1, temperature=0.5):
    """Per-anchor NT-Xent terms of the global batch, anchors [out0; out1] (full matrix)."""
    n = out0.shape[0]
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    logits = (z @ z.T / temperature).masked_fill(torch.eye(2 * n, dtype=torch.bool),
                                                 float("-inf"))
    labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, labels, reduction="none")


def worker():
    import torch.distributed as dist
    from fastssl.compat.lightly import NTXentLoss
    rank = dist.get_rank()
    model = torch.nn.parallel.DistributedDataParallel(_model())
    criterion = NTXentLoss(gather_distributed=True)  # lightly's defaults otherwise
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    values = []
    for step in range(STEPS):
        x0, x1 = _batch(step)
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        loss = criterion(model(x0[mine]), model(x1[mine]))
        values.append(float(loss))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"weight": model.module.weight.detach().clone(),
            "bias": model.module.bias.detach().clone(), "values": values}


def test_ddp_training_equals_single_process_formula():
    results = run_torchrun(f"{__file__}:worker", WORLD)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x0, x1 = _batch(step)
        terms = _formula_terms(model(x0), model(x1))
        n = WORLD * ROWS
        for rank, res in enumerate(results):
            own = torch.cat([terms[rank * ROWS:(rank + 1) * ROWS],
                             terms[n + rank * ROWS:n + (rank + 1) * ROWS]])
            assert res["values"][step] == pytest.approx(float(own.mean()), rel=1e-10)
        opt.zero_grad()
        terms.mean().backward()
        opt.step()
    for res in results:
        torch.testing.assert_close(res["weight"], model.weight.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res["bias"], model.bias.detach(), rtol=1e-10, atol=1e-12)


CLIP_MODES = [dict(gather_with_grad=True, local_loss=False),
              dict(gather_with_grad=True, local_loss=True),
              dict(gather_with_grad=False, local_loss=False)]


def _clip_formula_terms(img, txt, scale):
    """open_clip's loss on the global batch, per row: (image->text, text->image) terms."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels, reduction="none"),
            F.cross_entropy(logits.T, labels, reduction="none"))


def _clip_features(model, x0, x1):
    return F.normalize(model(x0), dim=1), F.normalize(model(x1), dim=1)


def clip_worker():
    import torch.distributed as dist
    from fastssl.compat.open_clip import ClipLoss
    rank, world = dist.get_rank(), dist.get_world_size()
    out = []
    for mode in CLIP_MODES:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        criterion = ClipLoss(rank=rank, world_size=world, **mode)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        values = []
        for step in range(STEPS):
            x0, x1 = _batch(step)
            mine = slice(rank * ROWS, (rank + 1) * ROWS)
            loss = criterion(*_clip_features(model, x0[mine], x1[mine]), 10.0)
            values.append(float(loss))
            opt.zero_grad()
            loss.backward()
            opt.step()
        out.append({"weight": model.module.weight.detach().clone(), "values": values})
    return out


def test_clip_loss_ddp_modes_equal_open_clip_formula():
    # open_clip after DDP's average: gather_with_grad=True gives the exact global gradient;
    # gather_with_grad=False only each rank's own features' part, 1/W of it. Values: global,
    # or (local_loss) the mean of the rank's own rows in both directions.
    results = run_torchrun(f"{__file__}:clip_worker", WORLD)
    for m, mode in enumerate(CLIP_MODES):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(STEPS):
            x0, x1 = _batch(step)
            rows_it, rows_ti = _clip_formula_terms(*_clip_features(model, x0, x1), 10.0)
            total = (rows_it.mean() + rows_ti.mean()) / 2
            for rank, res in enumerate(results):
                own = slice(rank * ROWS, (rank + 1) * ROWS)
                want = ((rows_it[own].mean() + rows_ti[own].mean()) / 2 if mode["local_loss"]
                        else total)
                assert res[m]["values"][step] == pytest.approx(float(want), rel=1e-10), mode
            opt.zero_grad()
            (total if mode["gather_with_grad"] else total / WORLD).backward()
            opt.step()
        for res in results:
            torch.testing.assert_close(res[m]["weight"], model.weight.detach(), rtol=1e-10,
                                       atol=1e-12, msg=str(mode))
