"""fastssl.compat.lightly's DINO family (DINOLoss, IBOTPatchLoss, KoLeoLoss) against lightly
1.5.26's formulas written out here in its eager form (stacked views, einsum, fill_diagonal_),
its defaults, call forms and center buffers; and against lightly itself where importable
(tests/compat/peers.py)."""
import pytest
import torch
import torch.nn.functional as F
from peers import lightly_module

from fastssl.compat import lightly as compat


def _views(n, B=4, K=10, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(B, K, generator=g)).to(dtype) for _ in range(n)]


def _lightly_dino(teacher_out, student_out, center, temp, student_temp):
    """lightly's DINOLoss.forward arithmetic (before the center update)."""
    t = F.softmax((torch.stack(teacher_out) - center) / torch.as_tensor(temp), dim=-1)
    s = F.log_softmax(torch.stack(student_out) / student_temp, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t, s)
    loss.fill_diagonal_(0)
    n_terms = loss.numel() - loss.diagonal().numel()
    return loss.sum() / (n_terms * t.shape[1])


def test_dino_loss_defaults_buffers_and_schedule():
    loss_fn = compat.DINOLoss()
    assert loss_fn.center.shape == (1, 1, 65536)
    assert loss_fn.teacher_temp == 0.04 and loss_fn.student_temp == 0.1
    assert loss_fn.center_momentum == 0.9 and loss_fn.warmup_teacher_temp_epochs == 30
    assert torch.equal(loss_fn.teacher_temp_schedule, torch.linspace(0.04, 0.04, 30))
    with pytest.raises(ValueError, match="Unknown mode 'median'"):
        compat.DINOLoss(center_mode="median")


@pytest.mark.parametrize("n_teacher,n_student", [(2, 2), (2, 6), (1, 3)])
def test_dino_loss_matches_lightly_over_steps(n_teacher, n_student):
    loss_fn = compat.DINOLoss(output_dim=10, warmup_teacher_temp=0.02, teacher_temp=0.07,
                              warmup_teacher_temp_epochs=3, center_momentum=0.8)
    center = torch.zeros(1, 1, 10)
    schedule = torch.linspace(0.02, 0.07, 3)
    calls = [dict(epoch=0), dict(epoch=1), dict(), dict(teacher_temp=0.05), dict(epoch=5)]
    for step, kw in enumerate(calls):
        teachers = _views(n_teacher, seed=10 + step)
        students = [s.requires_grad_(True) for s in _views(n_student, seed=20 + step)]
        if "teacher_temp" in kw:
            temp = kw["teacher_temp"]
        elif kw.get("epoch") is not None and kw["epoch"] < 3:
            temp = schedule[kw["epoch"]]
        else:
            temp = 0.07
        want = _lightly_dino(teachers, students, center, temp, 0.1)
        want_g = torch.autograd.grad(want, students)
        got = loss_fn(teachers, students, **kw)
        # a student view paired with no teacher view (1 teacher view: student view 0) gets no
        # gradient (lightly's: zeros, from the zeroed diagonal)
        got_g = [torch.zeros_like(s) if g is None else g
                 for s, g in zip(students, torch.autograd.grad(got, students, allow_unused=True))]
        assert got.shape == () and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for a, b in zip(got_g, want_g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        center = center * 0.8 + torch.stack(teachers).mean(dim=(0, 1), keepdim=True) * 0.2
        torch.testing.assert_close(loss_fn.center, center)


def _lightly_ibot(teacher_out, student_out, mask, center, temp, student_temp):
    t = F.softmax((teacher_out - center) / torch.tensor(temp), dim=-1)
    s = F.log_softmax(student_out / student_temp, dim=-1)
    loss = -torch.sum(t * s, dim=-1)
    n = mask.sum(dim=(1, 2), keepdim=True).clamp(min=1.0)
    weight = (1.0 / n).expand_as(mask)[mask]
    return (loss * weight).sum() / mask.shape[0]


def test_ibot_patch_loss_matches_lightly():
    loss_fn = compat.IBOTPatchLoss(output_dim=10, center_momentum=0.7)
    assert "center.center" in loss_fn.state_dict()
    assert loss_fn.center.value.shape == (1, 10)
    center = torch.zeros(1, 10)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        mask = torch.rand(3, 2, 3, generator=g) < 0.5
        mask[0, 0, 0] = True
        M = int(mask.sum())
        teacher = torch.randn(M, 10, generator=g)
        student = torch.randn(M, 10, generator=g, requires_grad=True)
        kw = dict(teacher_temp=0.06) if step == 2 else {}
        temp = 0.06 if step == 2 else 0.04
        want = _lightly_ibot(teacher, student, mask, center, temp, 0.1)
        (want_g,) = torch.autograd.grad(want, student)
        got = loss_fn(teacher, student, mask, **kw)
        (got_g,) = torch.autograd.grad(got, student)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)
        center = center * 0.7 + teacher.mean(dim=0, keepdim=True) * 0.3
        torch.testing.assert_close(loss_fn.center.value, center)
    with pytest.raises(ValueError, match="masks"):
        loss_fn(teacher[:-1], student[:-1].detach(), mask)


@pytest.mark.parametrize("p", [2, 1, 3.0])
def test_koleo_loss_matches_lightly(p):
    x = torch.randn(9, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    xn = F.normalize(x, p=2, dim=-1, eps=1e-8)
    cos = xn @ xn.t()
    cos = cos - 3 * torch.eye(9)  # lightly fills the diagonal with -2
    d = torch.nn.PairwiseDistance(p=p, eps=1e-8)(xn, xn[cos.argmax(dim=1)])
    want = -(d + 1e-8).log().mean()
    (want_g,) = torch.autograd.grad(want, x)
    loss_fn = compat.KoLeoLoss(p=p)
    assert loss_fn.p == p and loss_fn.eps == 1e-8
    got = loss_fn(x)
    (got_g,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_g, want_g, rtol=1e-5, atol=1e-6)


def test_against_lightly_itself():
    dino_mod = lightly_module("dino_loss")
    teachers, students = _views(2, seed=1), _views(4, seed=2)
    ours, theirs = compat.DINOLoss(output_dim=10), dino_mod.DINOLoss(output_dim=10)
    for epoch in (0, 40):
        torch.testing.assert_close(ours(teachers, students, epoch=epoch),
                                   theirs(teachers, students, epoch=epoch))
        torch.testing.assert_close(ours.center, theirs.center)
        torch.testing.assert_close(ours(teachers, students, teacher_temp=0.06),
                                   theirs(teachers, students, teacher_temp=0.06))
    koleo_mod = lightly_module("koleo_loss")
    x = torch.randn(7, 5)
    for p in (2, 1):
        torch.testing.assert_close(compat.KoLeoLoss(p=p)(x), koleo_mod.KoLeoLoss(p=p)(x))
    ibot_mod = lightly_module("ibot_loss")
    mask = torch.rand(3, 2, 3, generator=torch.Generator().manual_seed(4)) < 0.5
    mask[0, 0, 0] = True
    M = int(mask.sum())
    t, s = torch.randn(M, 10), torch.randn(M, 10)
    ours, theirs = compat.IBOTPatchLoss(output_dim=10), ibot_mod.IBOTPatchLoss(output_dim=10)
    for _ in range(2):
        torch.testing.assert_close(ours(t, s, mask), theirs(t, s, mask))
        torch.testing.assert_close(ours.state_dict()["center.center"],
                                   theirs.state_dict()["center.center"])
