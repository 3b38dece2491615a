"""Public-API fuzz test (issue 12): every public function of fastssl.functional and every
module of fastssl.losses, driven with malformed inputs from a small grammar (wrong ndim or
shape, mismatched batch or D, int/bool/uint8 dtypes, another device, non-contiguous,
expanded stride-0 and empty tensors, bad hyperparameters: negative/zero/nan/inf/strings/None
for numbers and flags, unknown choices). Each call must either raise ValueError/TypeError
whose message starts with the name of an argument, or return a finite result equal to the
reference backend's on the same input. Deterministic: every single mutation of every argument
of every target (no sampling), seeded inputs, a few seconds on CPU."""
from __future__ import annotations

import math
import re

import pytest
import torch

import fastssl
from fastssl import functional
from fastssl import losses as L

B, D = 6, 5


def _t(seed, rows=B, cols=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g)


# ---- the grammar ---------------------------------------------------------------------------

def _tensor_mutations(x: torch.Tensor, allow_device: bool):
    yield "1-D", x[0]
    yield "3-D", x[None]
    yield "one row fewer", x[:-1]
    yield "one column more", torch.cat([x, x[:, :1]], 1)
    for dtype in (torch.int64, torch.int32, torch.bool, torch.uint8):
        yield f"dtype {dtype}", x.to(dtype)
    yield "non-contiguous", x.transpose(0, -1).contiguous().transpose(0, -1)
    yield "expanded stride 0", x[:1].expand_as(x)
    yield "empty batch", x[:0]
    yield "a list", x.tolist()
    yield "None", None
    if allow_device:
        yield "meta device", x.to("meta")


FLOAT_BAD = [-1.0, 0.0, math.nan, math.inf, -math.inf, "0.1", None, True, torch.tensor(0.1)]
NONNEG_BAD = [-1.0, math.nan, math.inf, "1", None, False]
INT_BAD = [0, -1, 1.5, "3", True, None]
FLAG_BAD = ["no", "False", 0, 1, None, torch.tensor(True)]
CHOICE_BAD = ["bogus", 3, None]


def _mutations(kind, value, allow_device):
    if kind == "tensor":
        yield from _tensor_mutations(value, allow_device)
    elif kind == "views":
        yield "a tensor", value[0]
        yield "one view", value[:1]
        for label, bad in _tensor_mutations(value[1], True):
            yield f"views[1] {label}", [value[0], bad] + list(value[2:])
    elif kind == "pos":
        for v in FLOAT_BAD:
            yield repr(v), v
    elif kind == "nonneg":
        for v in NONNEG_BAD:
            yield repr(v), v
    elif kind in ("unit_open", "unit"):
        for v in (-0.1, 1.5, math.nan, "0.5", None) + ((0.0,) if kind == "unit_open" else ()):
            yield repr(v), v
    elif kind == "int":
        for v in INT_BAD:
            yield repr(v), v
    elif kind == "flag":
        for v in FLAG_BAD:
            yield repr(v), v
    elif kind == "choice":
        for v in CHOICE_BAD:
            yield repr(v), v
    elif kind == "weights":
        for v in ([], "abc", [math.nan], [1.0, "x"], None, 3.0):
            yield repr(v), v
    elif kind == "index":
        yield "uint8", value.to(torch.uint8)
        yield "bool", torch.ones(B, dtype=torch.bool)
        yield "float", value.float()
        yield "out of range", value + 100
        yield "negative", value - 3
        yield "wrong length", value[:-1]
        yield "2-D", value[None]
        yield "list", value.tolist()
    elif kind == "u":
        yield "float64", value.double()
        yield "float16", value.half()
        yield "expanded", torch.zeros(1).expand(value.shape[0])
        yield "2-D", value[None]
        yield "int", value.long()
        yield "empty", value[:0]
        yield "meta", value.to("meta")
    elif kind == "callable":
        yield "not callable", 3
        yield "wrong shape", lambda o0, o1: torch.ones(o0.shape[0] + 1)
        yield "not a tensor", lambda o0, o1: [1.0] * o0.shape[0]
        yield "int weights", lambda o0, o1: torch.ones(o0.shape[0], dtype=torch.long)
    elif kind == "queue_scores":
        yield "a tensor", _t(9, 4, 7)
        yield "wrong count", [_t(9, 4, 7)]
        yield "wrong K", [_t(9, 4, 8), None]
        yield "int", [_t(9, 4, 7).long(), None]


# ---- the targets: name -> (call, {arg: (kind, valid value)}, stateful arg factories) ----------

def _sog_u():
    return torch.zeros(20)


TARGETS = {
    "nt_xent": (lambda a: functional.nt_xent(a["z1"], a["z2"], a["temperature"],
                                            gather_distributed=a["gather_distributed"]),
                {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "temperature": ("pos", 0.2),
                 "gather_distributed": ("flag", False)}),
    "info_nce": (lambda a: functional.info_nce(a["q"], a["k"], a["temperature"],
                                              symmetric=a["symmetric"],
                                              gather_distributed=a["gather_distributed"]),
                 {"q": ("tensor", _t(1)), "k": ("tensor", _t(2)), "temperature": ("pos", 0.2),
                  "symmetric": ("flag", True), "gather_distributed": ("flag", False)}),
    "dcl": (lambda a: functional.dcl(a["z1"], a["z2"], a["temperature"], weight_fn=a["weight_fn"],
                                    gather_distributed=a["gather_distributed"]),
            {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "temperature": ("pos", 0.2),
             "weight_fn": ("callable", None), "gather_distributed": ("flag", False)}),
    "dclw": (lambda a: functional.dclw(a["z1"], a["z2"], a["temperature"], sigma=a["sigma"],
                                      gather_distributed=a["gather_distributed"]),
             {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "temperature": ("pos", 0.2),
              "sigma": ("pos", 0.5), "gather_distributed": ("flag", False)}),
    "sogclr": (lambda a: functional.sogclr(a["z1"], a["z2"], a["index"], a["u"], gamma=a["gamma"],
                                          temperature=a["temperature"],
                                          gather_distributed=a["gather_distributed"]),
               {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)),
                "index": ("index", torch.tensor([0, 3, 5, 7, 11, 19])), "u": ("u", _sog_u()),
                "gamma": ("unit_open", 0.9), "temperature": ("pos", 0.2),
                "gather_distributed": ("flag", False)}),
    "sce": (lambda a: functional.sce(a["q"], a["k"], a["queue"], coeff=a["coeff"],
                                    temperature=a["temperature"], temperature_m=a["temperature_m"],
                                    use_keys=a["use_keys"], gather_distributed=a["gather_distributed"]),
            {"q": ("tensor", _t(1)), "k": ("tensor", _t(2)),
             "queue": ("tensor", torch.nn.functional.normalize(_t(3, 7), dim=1)),
             "coeff": ("unit", 0.5), "temperature": ("pos", 0.2), "temperature_m": ("pos", 0.1),
             "use_keys": ("flag", True), "gather_distributed": ("flag", False)}),
    "sfrik": (lambda a: functional.sfrik(a["z1"], a["z2"], weights=a["weights"],
                                        sim_coeff=a["sim_coeff"], mmd_coeff=a["mmd_coeff"],
                                        gather_distributed=a["gather_distributed"]),
              {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "weights": ("weights", (1.0, 4.0)),
               "sim_coeff": ("nonneg", 40.0), "mmd_coeff": ("nonneg", 1.0),
               "gather_distributed": ("flag", False)}),
    "sfrik_mmd": (lambda a: functional.sfrik_mmd(a["z"], weights=a["weights"],
                                                gather_distributed=a["gather_distributed"]),
                  {"z": ("tensor", _t(1)), "weights": ("weights", (1.0, 4.0)),
                   "gather_distributed": ("flag", False)}),
    "auh": (lambda a: functional.auh(a["z1"], a["z2"], sim_coeff=a["sim_coeff"],
                                    unif_coeff=a["unif_coeff"], scale=a["scale"],
                                    gather_distributed=a["gather_distributed"]),
            {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "sim_coeff": ("nonneg", 30.0),
             "unif_coeff": ("nonneg", 1.0), "scale": ("pos", 2.5),
             "gather_distributed": ("flag", False)}),
    "groco": (lambda a: functional.groco(a["views"], topk_neg=a["topk_neg"], steepness=a["steepness"],
                                        network=a["network"], distribution=a["distribution"],
                                        gather_distributed=a["gather_distributed"]),
              {"views": ("views", [_t(1), _t(2)]), "topk_neg": ("int", 3), "steepness": ("pos", 2.0),
               "network": ("choice", "odd_even"), "distribution": ("choice", "cauchy"),
               "gather_distributed": ("flag", False)}),
    "soft_sort": (lambda a: functional.soft_sort(a["x"], network=a["network"], steepness=a["steepness"],
                                                distribution=a["distribution"],
                                                art_lambda=a["art_lambda"],
                                                return_permutation=a["return_permutation"]),
                  {"x": ("tensor", _t(1)), "network": ("choice", "bitonic"),
                   "steepness": ("pos", 5.0), "distribution": ("choice", "logistic_phi"),
                   "art_lambda": ("nonneg", 0.25), "return_permutation": ("flag", True)}),
    "sinkhorn": (lambda a: functional.sinkhorn(a["scores"], epsilon=a["epsilon"],
                                              iterations=a["iterations"],
                                              gather_distributed=a["gather_distributed"]),
                 {"scores": ("tensor", _t(1, B, 7)), "epsilon": ("pos", 0.05),
                  "iterations": ("int", 3), "gather_distributed": ("flag", False)}),
    "swav": (lambda a: functional.swav(a["scores"], n_assign_crops=a["n_assign_crops"],
                                      temperature=a["temperature"], epsilon=a["epsilon"],
                                      sinkhorn_iterations=a["sinkhorn_iterations"],
                                      queue_scores=a["queue_scores"],
                                      gather_distributed=a["gather_distributed"]),
             {"scores": ("views", [_t(1, B, 7), _t(2, B, 7), _t(3, B, 7)]),
              "n_assign_crops": ("int", 2), "temperature": ("pos", 0.1), "epsilon": ("pos", 0.05),
              "sinkhorn_iterations": ("int", 3), "queue_scores": ("queue_scores", None),
              "gather_distributed": ("flag", False)}),
    "dino": (lambda a: functional.dino(a["student_out"], a["teacher_out"], center=a["center"],
                                      student_temp=a["student_temp"],
                                      teacher_temp=a["teacher_temp"], centering=a["centering"],
                                      sinkhorn_iterations=a["sinkhorn_iterations"],
                                      ignore_diagonal=a["ignore_diagonal"],
                                      gather_distributed=a["gather_distributed"]),
             {"student_out": ("views", [_t(1, B, 7), _t(2, B, 7), _t(3, B, 7)]),
              "teacher_out": ("views", [_t(4, B, 7), _t(5, B, 7)]),
              "center": ("tensor", _t(6, 1, 7)), "student_temp": ("pos", 0.1),
              "teacher_temp": ("pos", 0.04), "centering": ("choice", "softmax"),
              "sinkhorn_iterations": ("int", 3), "ignore_diagonal": ("flag", True),
              "gather_distributed": ("flag", False)}),
    "dino_center": (lambda a: functional.dino_center(a["teacher_out"], a["center"],
                                                    momentum=a["momentum"],
                                                    gather_distributed=a["gather_distributed"]),
                    {"teacher_out": ("views", [_t(4, B, 7), _t(5, B, 7)]),
                     "center": ("tensor", _t(6, 1, 7)), "momentum": ("unit", 0.9),
                     "gather_distributed": ("flag", False)}),
    "ibot_patch": (lambda a: functional.ibot_patch(a["student_patches"], a["teacher_patches"],
                                                  a["masks"], student_temp=a["student_temp"],
                                                  teacher_temp=a["teacher_temp"],
                                                  centering=a["centering"],
                                                  gather_distributed=a["gather_distributed"]),
                   {"student_patches": ("tensor", _t(1, B * 4, 7).reshape(B, 4, 7)),
                    "teacher_patches": ("tensor", _t(2, B * 4, 7).reshape(B, 4, 7)),
                    "masks": ("tensor", _t(3, B, 4) > 0), "student_temp": ("pos", 0.1),
                    "teacher_temp": ("pos", 0.04), "centering": ("choice", "sinkhorn_knopp"),
                    "gather_distributed": ("flag", False)}),
    "koleo": (lambda a: functional.koleo(a["z"], eps=a["eps"],
                                        gather_distributed=a["gather_distributed"]),
              {"z": ("tensor", _t(1)), "eps": ("pos", 1e-8), "gather_distributed": ("flag", False)}),
    # modules: constructor and forward arguments in one namespace
    "NTXentLoss": (lambda a: L.NTXentLoss(a["temperature"],
                                                   gather_distributed=a["gather_distributed"])(a["z1"], a["z2"]),
                   {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "temperature": ("pos", 0.2),
                    "gather_distributed": ("flag", False)}),
    "InfoNCELoss": (lambda a: L.InfoNCELoss(a["temperature"], a["symmetric"])(a["q"], a["k"]),
                    {"q": ("tensor", _t(1)), "k": ("tensor", _t(2)), "temperature": ("pos", 0.2),
                     "symmetric": ("flag", False)}),
    "DCLLoss": (lambda a: L.DCLLoss(a["temperature"], a["weight_fn"])(a["z1"], a["z2"]),
                {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "temperature": ("pos", 0.2),
                 "weight_fn": ("callable", None)}),
    "DCLWLoss": (lambda a: L.DCLWLoss(a["temperature"], a["sigma"])(a["z1"], a["z2"]),
                 {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "temperature": ("pos", 0.2),
                  "sigma": ("pos", 0.5)}),
    "SogCLRLoss": (lambda a: L.SogCLRLoss(a["num_samples"], a["gamma"])(a["z1"], a["z2"], a["index"]),
                   {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)),
                    "index": ("index", torch.tensor([0, 3, 5, 7, 11, 19])),
                    "num_samples": ("int", 20), "gamma": ("unit_open", 0.9)}),
    "SCELoss": (lambda a: _seeded(lambda: L.SCELoss(a["dim"], a["queue_size"], a["coeff"]))(a["q"], a["k"]),
                {"q": ("tensor", _t(1)), "k": ("tensor", _t(2)), "dim": ("int", D),
                 "queue_size": ("int", 8), "coeff": ("unit", 0.5)}),
    "SFRIKLoss": (lambda a: L.SFRIKLoss(a["weights"], a["sim_coeff"])(a["z1"], a["z2"]),
                  {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "weights": ("weights", (1.0, 4.0)),
                   "sim_coeff": ("nonneg", 40.0)}),
    "AUHLoss": (lambda a: L.AUHLoss(a["sim_coeff"], a["unif_coeff"], a["scale"])(a["z1"], a["z2"]),
                {"z1": ("tensor", _t(1)), "z2": ("tensor", _t(2)), "sim_coeff": ("nonneg", 30.0),
                 "unif_coeff": ("nonneg", 1.0), "scale": ("pos", 2.5)}),
    "GroCoLoss": (lambda a: L.GroCoLoss(a["topk_neg"], a["steepness"], network=a["network"])(a["views"]),
                  {"views": ("views", [_t(1), _t(2)]), "topk_neg": ("int", 3),
                   "steepness": ("pos", 2.0), "network": ("choice", "bitonic")}),
    "SoftSortNet": (lambda a: L.SoftSortNet(a["sorting_network_type"], a["size"],
                                            steepness=a["steepness"])(a["x"]),
                    {"x": ("tensor", _t(1)), "sorting_network_type": ("choice", "odd_even"),
                     "size": ("int", D),
                     "steepness": ("pos", 5.0)}),
    "SwAVLoss": (lambda a: L.SwAVLoss(a["temperature"], a["epsilon"], a["sinkhorn_iterations"],
                                      a["n_assign_crops"], a["queue_length"])(
                     a["scores"], embeddings=a["embeddings"], prototypes=a["prototypes"]),
                 {"scores": ("views", [_t(1, B, 7), _t(2, B, 7)]), "temperature": ("pos", 0.1),
                  "epsilon": ("pos", 0.05), "sinkhorn_iterations": ("int", 3),
                  "n_assign_crops": ("int", 2), "queue_length": ("int", 12),
                  "embeddings": ("views", [_t(4), _t(5)]), "prototypes": ("tensor", _t(6, 7, D))}),
    "DINOLoss": (lambda a: L.DINOLoss(7, a["student_temp"], a["teacher_temp"],
                                      centering=a["centering"])(a["student_out"],
                                                                a["teacher_out"], a["epoch"]),
                 {"student_out": ("views", [_t(1, B, 7), _t(2, B, 7), _t(3, B, 7)]),
                  "teacher_out": ("views", [_t(4, B, 7), _t(5, B, 7)]),
                  "student_temp": ("pos", 0.1), "teacher_temp": ("pos", 0.04),
                  "centering": ("choice", "softmax"), "epoch": ("int", 2)}),
    "IBOTPatchLoss": (lambda a: L.IBOTPatchLoss(7, a["student_temp"])(
                          a["student_patches"], a["teacher_patches"], a["masks"]),
                      {"student_patches": ("tensor", _t(1, B * 4, 7).reshape(B, 4, 7)),
                       "teacher_patches": ("tensor", _t(2, B * 4, 7).reshape(B, 4, 7)),
                       "masks": ("tensor", _t(3, B, 4) > 0), "student_temp": ("pos", 0.1)}),
    "KoLeoLoss": (lambda a: L.KoLeoLoss(a["eps"])(a["z"]),
                  {"z": ("tensor", _t(1)), "eps": ("pos", 1e-8)}),
}


def _seeded(make):
    torch.manual_seed(0)  # SCELoss draws its initial queue
    return make()


def _fresh(value):
    if isinstance(value, torch.Tensor):
        return value.clone() if value.layout == torch.strided and value.numel() and \
            value.stride() and 0 not in value.stride() else value
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    return value


def _finite_values(out):
    outs = out if isinstance(out, tuple) else (out,)
    return [o for o in outs if o is not None]


NAME = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*)(\[\d+\])?:")


def _cases():
    for target, (_, spec) in TARGETS.items():
        tensor_args = [a for a, (k, _) in spec.items() if k in ("tensor", "views")]
        for arg, (kind, value) in spec.items():
            allow_device = len(tensor_args) > 1 and arg != tensor_args[0]
            for label, bad in _mutations(kind, value, allow_device):
                yield pytest.param(target, arg, label, bad, id=f"{target}-{arg}-{label}")


@pytest.mark.parametrize("target,arg,label,bad", list(_cases()))
def test_malformed_input_is_named_or_computed_right(target, arg, label, bad):
    call, spec = TARGETS[target]
    args = {a: _fresh(v) for a, (_, v) in spec.items()}
    args[arg] = bad
    try:
        out = call(args)
    except (ValueError, TypeError) as e:
        m = NAME.match(str(e))
        assert m, f"{target}({arg}={label}): message does not start with an argument: {e}"
        assert m.group(1) in spec or m.group(1) in ("weight_fn",), \
            f"{target}({arg}={label}): message names {m.group(1)!r}, not an argument: {e}"
        return
    # accepted: a finite result equal to the reference backend's on the same input
    ref_args = {a: _fresh(v) for a, (_, v) in spec.items()}
    ref_args[arg] = _fresh(bad)
    with fastssl.use_backend("reference"):
        ref = call(ref_args)
    for o, r in zip(_finite_values(out), _finite_values(ref)):
        assert o.device.type == "cpu", f"{target}({arg}={label}) returned a {o.device} tensor"
        assert torch.isfinite(o).all(), f"{target}({arg}={label}) gave a non-finite result"
        torch.testing.assert_close(o.float(), r.float(), rtol=2e-4, atol=2e-5,
                                   msg=lambda m: f"{target}({arg}={label}): {m}")


def test_the_grammar_covers_every_public_name():
    assert set(functional.__all__) <= set(TARGETS)
    assert set(L.__all__) <= set(TARGETS)
