"""fastssl.reference.dino against closed forms and against the authors' formulas re-derived
here (facebookresearch/dino DINOLoss, facebookresearch/dinov2 sinkhorn_knopp_teacher,
iBOTPatchLoss, KoLeoLoss), plus the named errors of bad input."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

# the module (fastssl.reference.dino is also the name of the function the package exports)
R = importlib.import_module("fastssl.reference.dino")

B, K = 6, 11


def _logits(n, rows=B, cols=K, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(rows, cols, generator=g, dtype=torch.float64)).to(dtype)
            for _ in range(n)]


def _dinov2_sinkhorn(t, temp, iters):
    """DINOv2's sinkhorn_knopp_teacher (one process), re-derived from its formula."""
    Q = torch.exp(t.double() / temp).t()
    Bn, Kn = Q.shape[1], Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(iters):
        Q = Q / Q.sum(dim=1, keepdim=True) / Kn
        Q = Q / Q.sum(dim=0, keepdim=True) / Bn
    return (Q * Bn).t()


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_uniform_student_gives_log_k(centering):
    students = [torch.zeros(B, K, dtype=torch.float64) for _ in range(4)]
    teachers = _logits(2, scale=0.1)
    loss = R.dino(students, teachers, centering=centering)
    assert abs(loss.item() - math.log(K)) < 1e-12


def test_one_hot_teacher_gives_negative_log_probability():
    students = _logits(3, seed=1)
    labels = [torch.randint(0, K, (B,), generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    # a logit 1 above the rest at teacher_temp 1e-3: exp(-1000) = 0 in float64
    teachers = [F.one_hot(lab, K).double() for lab in labels]
    loss = R.dino(students, teachers, teacher_temp=1e-3, student_temp=0.1)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    want = sum(F.cross_entropy(students[j] / 0.1, labels[i]) for i, j in pairs) / len(pairs)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)


def test_dino_equals_the_authors_loop_and_center():
    students = _logits(4, seed=2)
    teachers = _logits(2, seed=3)
    center = _logits(1, rows=1, seed=4)[0]
    loss = R.dino(students, teachers, center=center, student_temp=0.1, teacher_temp=0.04)
    # facebookresearch/dino DINOLoss.forward: stacked crops, chunked, skip v == iq
    student_out = torch.cat(students) / 0.1
    teacher_out = F.softmax((torch.cat(teachers) - center) / 0.04, dim=-1)
    total, n = 0, 0
    for iq, q in enumerate(teacher_out.chunk(2)):
        for v, s in enumerate(student_out.chunk(4)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            n += 1
    torch.testing.assert_close(loss, total / n)
    # lightly's einsum form with the diagonal zeroed (the same pairs)
    t = F.softmax((torch.stack(teachers) - center) / 0.04, dim=-1)
    s = F.log_softmax(torch.stack(students) / 0.1, dim=-1)
    m = -torch.einsum("tbd,sbd->ts", t, s)
    m.fill_diagonal_(0)
    torch.testing.assert_close(loss, m.sum() / ((m.numel() - 2) * B))


def test_keep_diagonal_averages_every_pair():
    students, teachers = _logits(2, seed=5), _logits(2, seed=6)
    loss = R.dino(students, teachers, ignore_diagonal=False, centering="sinkhorn_knopp")
    q = _dinov2_sinkhorn(torch.cat(teachers), 0.04, 3).chunk(2)
    want = sum(-(q[i] * F.log_softmax(students[j] / 0.1, dim=-1)).sum(-1).mean()
               for i in range(2) for j in range(2)) / 4
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("iters", [0, 1, 3, 5])
def test_sinkhorn_teacher_equals_dinov2(iters):
    t = _logits(1, rows=12, seed=7, scale=0.05)[0]  # logits / 0.04 stay inside float64's exp
    got = R.sinkhorn_knopp_teacher(t, 0.04, iters)
    torch.testing.assert_close(got, _dinov2_sinkhorn(t, 0.04, iters))
    if iters:
        torch.testing.assert_close(got.sum(dim=1), torch.ones(12, dtype=torch.float64))


def test_sinkhorn_centering_uses_every_teacher_crop():
    students, teachers = _logits(3, seed=8), _logits(2, seed=9, scale=0.1)
    loss = R.dino(students, teachers, centering="sinkhorn_knopp", teacher_temp=0.05,
                  sinkhorn_iterations=3)
    q = _dinov2_sinkhorn(torch.cat(teachers), 0.05, 3).chunk(2)
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    want = sum(-(q[i] * F.log_softmax(students[j] / 0.1, dim=-1)).sum(-1).mean()
               for i, j in pairs) / 4
    torch.testing.assert_close(loss, want)


def test_dino_center_closed_form():
    teachers = _logits(2, seed=10)
    c = _logits(1, rows=1, seed=11)[0]
    got = R.dino_center(teachers, c, momentum=0.7)
    torch.testing.assert_close(got, 0.7 * c + 0.3 * torch.cat(teachers).mean(0, keepdim=True))


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_ibot_patch_equals_dinov2_unmasked_form(centering):
    g = torch.Generator().manual_seed(12)
    P = 5
    s = torch.randn(4, P, K, generator=g, dtype=torch.float64)
    t = 0.1 * torch.randn(4, P, K, generator=g, dtype=torch.float64)
    masks = torch.rand(4, P, generator=g) < 0.5
    masks[0] = False  # an image without masked tokens weighs nothing (clamped count)
    masks[1, 0] = True
    center = None if centering == "sinkhorn_knopp" else 0.1 * torch.randn(1, K, generator=g,
                                                                          dtype=torch.float64)
    loss = R.ibot_patch(s, t, masks, center=center, centering=centering)
    # DINOv2 iBOTPatchLoss.forward on the full (B, P, K) tokens with the teacher targets
    if centering == "softmax":
        q = F.softmax((t - center) / 0.04, dim=-1)
    else:
        q = torch.zeros_like(t)
        q[masks] = _dinov2_sinkhorn(t[masks], 0.04, 3)
    per_token = torch.sum(q * F.log_softmax(s / 0.1, dim=-1), dim=-1)
    per_image = (per_token * masks.double()).sum(-1) / masks.sum(-1).clamp(min=1.0)
    torch.testing.assert_close(loss, -per_image.mean())


def _simplex(n):
    """n + 1 unit vectors in R^(n+1) with pairwise inner product -1/n (a regular simplex)."""
    e = torch.eye(n + 1, dtype=torch.float64)
    return F.normalize(e - e.mean(0, keepdim=True), dim=1)


@pytest.mark.parametrize("n", [2, 3, 7])
def test_koleo_of_a_regular_simplex(n):
    x = 3.0 * _simplex(n)  # koleo normalises
    loss = R.koleo(x, eps=1e-12)
    assert abs(loss.item() + 0.5 * math.log(2 + 2 / n)) < 1e-9


def test_koleo_equals_dinov2_formula():
    z = torch.randn(9, 5, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    x = F.normalize(z, eps=1e-8, p=2, dim=-1)
    dots = x @ x.t()
    dots.view(-1)[:: 10].fill_(-1)
    nn = dots.argmax(dim=1)
    want = -torch.log(torch.nn.PairwiseDistance(2, eps=1e-8)(x, x[nn]) + 1e-8).mean()
    torch.testing.assert_close(R.koleo(z), want)


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input_named_errors():
    s, t = _logits(3), _logits(2)
    with pytest.raises(ValueError, match="student_out\\[1\\]"):
        R.dino([s[0], s[1][:-1], s[2]], t)
    with pytest.raises(ValueError, match="teacher_out\\[0\\]"):
        R.dino(s, [t[0][:, :-1], t[1]])
    with pytest.raises(ValueError, match="teacher_out: expected at most"):
        R.dino(s[:1], t)
    with pytest.raises(ValueError, match="center: expected shape"):
        R.dino(s, t, center=torch.zeros(2, K, dtype=torch.float64))
    with pytest.raises(ValueError, match="center: not used"):
        R.dino(s, t, center=torch.zeros(1, K, dtype=torch.float64), centering="sinkhorn_knopp")
    for name in ("student_temp", "teacher_temp"):
        with pytest.raises(ValueError, match=name):
            R.dino(s, t, **{name: 0.0})
        with pytest.raises(ValueError, match=name):
            R.dino(s, t, **{name: -0.1})
    with pytest.raises(ValueError, match="centering"):
        R.dino(s, t, centering="mean")
    with pytest.raises(ValueError, match="at least two crops"):
        R.dino(s[:1], t[:1])
    with pytest.raises(TypeError, match="student_out"):
        R.dino(torch.stack(s), t)
    sp = torch.zeros(2, 3, K, dtype=torch.float64)
    with pytest.raises(ValueError, match="masks: expected shape"):
        R.ibot_patch(sp, sp, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="masks: expected dtype"):
        R.ibot_patch(sp, sp, torch.ones(2, 3))
    with pytest.raises(ValueError, match="teacher_patches"):
        R.ibot_patch(sp, sp[:, :2], torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="teacher_temp"):
        R.ibot_patch(sp, sp, torch.ones(2, 3, dtype=torch.bool), teacher_temp=0)
    with pytest.raises(ValueError, match="center: expected shape"):
        R.ibot_patch(sp, sp, torch.ones(2, 3, dtype=torch.bool), center=torch.zeros(1, K + 1))
    with pytest.raises(ValueError, match="center: expected shape"):
        R.dino_center(t, torch.zeros(1, K + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="momentum"):
        R.dino_center(t, torch.zeros(1, K, dtype=torch.float64), momentum=1.5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        R.koleo(torch.randn(1, 4))
    with pytest.raises(ValueError, match="eps"):
        R.koleo(torch.randn(3, 4), eps=0.0)
