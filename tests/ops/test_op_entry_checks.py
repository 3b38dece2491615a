"""The entry check of every registered op (issue 22, points 4 and 10).

Ops are enumerated from ``torch.ops.fastssl`` (as tests/ops/test_registered_ops_memory.py
does), so a new op is covered without editing this file. For each op:

* a call with one tensor argument on ``meta`` and the others on the CPU raises a ValueError
  naming an argument and both devices (the dispatcher sends such a call to the fake kernel,
  which returned uninitialised CPU memory before);
* a bad ``backend`` string raises a ValueError naming ``backend`` (was a raw KeyError or
  AttributeError);
* a 0-d tensor where the op expects a matrix or vector raises a ValueError naming it (was an
  IndexError deep in a kernel); nothing ends in IndexError, KeyError, AttributeError or
  ZeroDivisionError.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import fastssl  # noqa: F401  (registers the ops)
from fastssl.ops import sortnet as sortnet_ops
from fastssl.ops import sphere as sphere_ops
from fastssl.ops import swav as swav_ops

RAW = (IndexError, KeyError, AttributeError, ZeroDivisionError)


def _op_names():
    return sorted(n for n in dir(torch.ops.fastssl)
                  if isinstance(getattr(torch.ops.fastssl, n, None), torch._ops.OpOverloadPacket))


def _schema(name):
    return getattr(torch.ops.fastssl, name).default._schema


def _is_tensor(a):
    return str(a.type).startswith(("Tensor", "Optional[Tensor]"))


def _base(name):
    """Arguments from the schema alone: (4, 4) float32 tensors, small numbers, the first
    backend name each op accepts ("torch" where it serves the op)."""
    args = {}
    for a in _schema(name).arguments:
        t = str(a.type)
        if _is_tensor(a):
            args[a.name] = torch.randn(4, 4)
        elif t in ("int", "SymInt"):
            args[a.name] = 1
        elif t == "float":
            args[a.name] = 1.0
        elif t == "bool":
            args[a.name] = False
        elif t.startswith(("float[]", "List[float]")):
            args[a.name] = [1.0, 0.5]
        elif t == "str":
            args[a.name] = {"backend": "cpp", "network": "odd_even",
                            "distribution": "cauchy"}.get(a.name, "")
        else:
            args[a.name] = None
    return args


_FITTED: dict = {}


def _fitted(name):
    """_base with each tensor reshaped to the rank the op's entry check asks for (learnt from
    its own messages, so the test follows the ops' specs without copying them)."""
    if name not in _FITTED:
        args = _base(name)
        for _ in range(40):
            try:
                _call(name, args)
                break
            except Exception as e:  # noqa: BLE001
                m = re.match(r"^(\w+): expected a (\d)-D", str(e))
                if not m or not isinstance(args.get(m.group(1)), torch.Tensor):
                    break
                k = int(m.group(2))
                args[m.group(1)] = torch.randn([4] * k) if k else torch.tensor(1.0)
        _FITTED[name] = args
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in _FITTED[name].items()}


def _tensor_args(name):
    return [a.name for a in _schema(name).arguments if _is_tensor(a)]


def _call(name, args):
    return getattr(torch.ops.fastssl, name)(**args)


OPS = _op_names()
MIXED = [(op, arg) for op in OPS if len(_tensor_args(op)) >= 2 for arg in _tensor_args(op)]


def test_every_family_is_enumerated():
    assert len(OPS) >= 20, OPS
    assert len({op for op, _ in MIXED}) >= 18, sorted({op for op, _ in MIXED})


@pytest.mark.parametrize("op,arg", MIXED, ids=[f"{o}-{a}" for o, a in MIXED])
def test_mixed_devices_are_refused(op, arg):
    args = _fitted(op)
    args[arg] = args[arg].to("meta")
    with pytest.raises(ValueError) as info:
        _call(op, args)
    msg = str(info.value)
    names = _tensor_args(op)
    assert msg.split(":")[0] in names, msg
    assert "meta" in msg and "cpu" in msg, msg
    # every argument but one on meta: the real kernel's side of the same check
    args = {k: (v.to("meta") if isinstance(v, torch.Tensor) and k != arg else v)
            for k, v in _fitted(op).items()}
    with pytest.raises(ValueError) as info:
        _call(op, args)
    assert "meta" in str(info.value) and "cpu" in str(info.value), str(info.value)


def test_mixed_devices_on_the_documented_examples():
    """The two calls of the issue: contrastive_lse with b on meta, swav_cross_entropy with meta
    targets (both returned garbage)."""
    a, b = torch.randn(5, 3), torch.randn(6, 3)
    self_col, pos_col = torch.tensor([0, 1, -1, 3, 5]), torch.tensor([1, -1, 2, 4, 0])
    with pytest.raises(ValueError, match=r"^b: expected device cpu .* got meta"):
        torch.ops.fastssl.contrastive_lse(a, b.to("meta"), self_col, pos_col, 1.0, 6, True,
                                          False, False, "torch")
    s = torch.randn(4, 7)
    with pytest.raises(ValueError, match=r"^targets: expected device cpu .* got meta"):
        torch.ops.fastssl.swav_cross_entropy(s, torch.softmax(s, 1).to("meta"), 0.1, True, "cpp")


def test_all_meta_still_infers_shapes():
    """One device for all (meta included) is fine: the fake kernel still serves torch.compile."""
    a, b = torch.randn(5, 3, device="meta"), torch.randn(6, 3, device="meta")
    cols = torch.zeros(5, dtype=torch.int64, device="meta")
    out = torch.ops.fastssl.contrastive_lse(a, b, cols, cols, 1.0, 6, True, True, True, "torch")
    assert [tuple(o.shape) for o in out] == [(5,), (0,), (5,), (6,)]
    assert all(o.device.type == "meta" for o in out)


BACKEND_OPS = [op for op in OPS if "backend" in {a.name for a in _schema(op).arguments}]


@pytest.mark.parametrize("op", BACKEND_OPS)
@pytest.mark.parametrize("bad", ["bogus", "", "CPP"])
def test_bad_backend_string_is_named(op, bad):
    args = _fitted(op)
    args["backend"] = bad
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        _call(op, args)


# tensor arguments whose 0-d form is valid (a scalar gradient or log-sum-exp)
SCALAR_ARGS = {("sphere_series_backward", "grad"), ("sphere_gauss_backward", "grad"),
               ("sphere_gauss_backward", "lse"), ("swav_cross_entropy", "grad_scale")}
ZERO_D = [(op, arg) for op in OPS for arg in _tensor_args(op) if (op, arg) not in SCALAR_ARGS]


@pytest.mark.parametrize("op,arg", ZERO_D, ids=[f"{o}-{a}" for o, a in ZERO_D])
def test_zero_dim_tensor_is_named(op, arg):
    args = _fitted(op)
    args[arg] = torch.tensor(1.0)
    with pytest.raises((ValueError, TypeError)) as info:
        _call(op, args)
    assert str(info.value).startswith(f"{arg}:"), str(info.value)


@pytest.mark.parametrize("op", OPS)
def test_no_raw_errors_from_schema_calls(op):
    """Bad strings for every str argument and 0-d tensors: only named errors."""
    for name, value in _base(op).items():
        for bad in (["bogus"] if isinstance(value, str) else
                    [torch.tensor(0.5)] if isinstance(value, torch.Tensor) else []):
            args = dict(_base(op), **{name: bad})
            try:
                _call(op, args)
            except RAW as e:
                pytest.fail(f"{op}({name}={bad!r}) raised raw {type(e).__name__}: {e}")
            except (ValueError, TypeError, RuntimeError):
                pass


def test_sphere_with_one_feature_is_named():
    """The Gegenbauer recurrence divides by D - 1 (was a ZeroDivisionError)."""
    x = torch.randn(4, 1)
    with pytest.raises(ValueError, match=r"^x: the Gegenbauer kernel needs"):
        torch.ops.fastssl.sphere_series_sum(x, None, [1.0, 2.0], "torch")
    with pytest.raises(ValueError, match=r"^a: the Gegenbauer kernel needs"):
        torch.ops.fastssl.sphere_series_backward(torch.tensor(1.0), x, None, [1.0, 2.0], "torch")
    with pytest.raises(ValueError, match=r"^weights:"):
        torch.ops.fastssl.sphere_series_sum(torch.randn(4, 3), None, [math.nan], "torch")


@pytest.mark.parametrize("call", [
    lambda: sortnet_ops.soft_sort(torch.randn(2, 5), backend="bogus"),
    lambda: sortnet_ops.groco_rows(torch.randn(2, 5), 2, backend="bogus"),
    lambda: sortnet_ops.groco_view_rows(torch.randn(3, 4), torch.randn(5, 4), torch.randn(1, 3, 4),
                                        0, 2, "odd_even", "cauchy", 1.0, backend="bogus"),
    lambda: sphere_ops.series_sum(torch.randn(3, 4), weights=[1.0], backend="bogus"),
    lambda: sphere_ops.gauss_lse(torch.randn(3, 4), scale=1.0, backend="bogus"),
    lambda: swav_ops.sinkhorn(torch.randn(3, 4), 0.05, 3, backend="bogus"),
    lambda: swav_ops.swav_cross_entropy(torch.randn(3, 4), torch.rand(3, 4), 0.1, backend="bogus"),
], ids=["soft_sort", "groco_rows", "groco_view_rows", "series_sum", "gauss_lse", "sinkhorn",
        "swav_cross_entropy"])
def test_ops_layer_functions_name_a_bad_backend(call):
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        call()
