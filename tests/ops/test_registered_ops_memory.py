"""Memory safety of the registered ops: malformed input gives a Python exception, never a signal.

``torch.ops.fastssl.*`` and ``fastssl._C`` are public once the library is imported, so every op
must check what it indexes with. The calls run in a subprocess (a heap corruption or segfault
kills the worker, not pytest); the parent restarts the worker after the case that killed it, so
one run names every crashing case.

Cases come from two sources, so that the test keeps working when op schemas change:
- each op's schema (``torch.ops.fastssl.<name>.default._schema``): a base call built from the
  argument types (tensors, ints, floats, bools, float lists; ``backend`` strings take each CPU
  backend name), then one argument at a time mutated (wrong shape, dtype, stride, range);
- a table of valid base calls for the ops with C++ kernels (and the ``fastssl._C`` functions),
  mutated the same way, plus known-dangerous calls that must raise (not return garbage).
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest

CPU_BACKENDS = ("cpp", "torch", "reference")
DISTRIBUTIONS = ("cauchy", "logistic", "logistic_phi", "gaussian", "reciprocal", "optimal")


# ---------------------------------------------------------------------------------------------
# case construction (runs in the worker; deterministic, so every worker builds the same list)


def _tensor_variants(t):
    """Malformed versions of t: each dimension one off, a dimension dropped or added, another
    dtype, a non-contiguous view, and out-of-range values for integer tensors."""
    import torch
    out = []
    shape = list(t.shape)
    for d in range(len(shape)):
        for delta in (-1, 1):
            s = list(shape)
            s[d] = max(0, s[d] + delta)
            if s != shape:
                out.append((f"dim{d}{delta:+d}", _like(t, s)))
    if shape:
        out.append(("drop_dim", _like(t, shape[:-1])))
    out.append(("add_dim", _like(t, shape + [2])))
    out.append(("empty", _like(t, [0] * max(1, len(shape)))))
    if t.is_floating_point():
        other = torch.float64 if t.dtype == torch.float32 else torch.float32
        out += [("dtype_other_float", t.to(other)), ("dtype_int64", t.to(torch.int64)),
                ("dtype_half", t.to(torch.float16)), ("nan", torch.full_like(t, math.nan))]
    else:
        out += [("dtype_float", t.to(torch.float32)), ("dtype_int32", t.to(torch.int32)),
                ("negative", t - 1000), ("too_large", t + 1000)]
    if t.dim() >= 1 and t.numel() > 0:
        wide = torch.zeros(shape + [2], dtype=t.dtype)
        wide[..., 0] = t
        out.append(("strided", wide[..., 0]))
    return out


def _like(t, shape):
    import torch
    if t.is_floating_point():
        return torch.randn(shape, dtype=t.dtype)
    hi = int(t.max()) + 1 if t.numel() else 2
    return torch.randint(0, max(hi, 1), shape, dtype=t.dtype)


def _int_variants(v):
    return [(f"int={x}", x) for x in sorted({-5, -1, 0, 1, v - 1, v + 1, 2 * v + 3}) if x != v]


def _float_variants(v):
    return [(f"float={x}", x) for x in (0.0, -1.0, math.nan, math.inf, -math.inf) if x != v]


def _schema_base(schema):
    """Base arguments for an op from its schema alone: (4, 4) float32 tensors, small ints."""
    import torch
    g = torch.Generator().manual_seed(0)
    args = {}
    for a in schema.arguments:
        t = str(a.type)
        if a.has_default_value():
            args[a.name] = a.default_value
        elif t.startswith("Tensor"):
            args[a.name] = torch.randn(4, 4, generator=g)
        elif t in ("int", "SymInt"):
            args[a.name] = 1
        elif t == "float":
            args[a.name] = 1.0
        elif t == "bool":
            args[a.name] = False
        elif t.startswith("float[]"):
            args[a.name] = [1.0, 0.5]
        elif t == "str":
            args[a.name] = _str_default(a.name)
        else:
            args[a.name] = None
    return args


def _str_default(name):
    return {"backend": "torch", "network": "odd_even", "distribution": "cauchy"}.get(name, "")


def _known_bases():
    """Valid calls of the ops with C++ kernels: {op name: [(label, kwargs)]}."""
    import torch
    from fastssl.ops.sortnet import DIST_IDS, network_tensor, sigma_bwd
    g = torch.Generator().manual_seed(1)
    B, n, k, P, D, N = 3, 6, 4, 2, 5, 8
    x = torch.randn(B, n, generator=g, dtype=torch.float64)
    y, Pm, saved = torch.ops.fastssl.soft_sort(x, "cpp", "odd_even", "cauchy", 10.0, 0.25, True)
    anchor = torch.nn.functional.normalize(
        torch.randn(B, D, generator=g, dtype=torch.float64), dim=1
    )
    negs = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    pos = torch.nn.functional.normalize(
        torch.randn(P, B, D, generator=g, dtype=torch.float64), dim=2
    )
    loss, sims, index = torch.ops.fastssl.groco_fused(anchor, negs, pos, 0, k, "odd_even", "cauchy",
                                                       10.0)
    scores = torch.randn(B, 7, generator=g)
    net_n = network_tensor("odd_even", n, torch.device("cpu"))
    net_f = network_tensor("odd_even", k + P, torch.device("cpu"))
    dist = (DIST_IDS["cauchy"], 10.0, 0.25, sigma_bwd(10.0))
    sort_kw = dict(network="odd_even", distribution="cauchy", steepness=10.0, art_lambda=0.25)
    # contrastive: 5 rows against 6 columns, masks with -1 (nothing masked) entries
    ca, cb = torch.randn(5, 3, generator=g), torch.randn(6, 3, generator=g)
    c_self, c_pos = torch.tensor([0, 1, -1, 3, 5]), torch.tensor([1, -1, 2, 4, 0])
    ops = {
        "soft_sort": [("", dict(x=x, want_p=True, **sort_kw))],
        "soft_sort_backward": [("", dict(gy=torch.randn_like(y), gP=torch.randn_like(Pm), d=saved,
                                          n=n, **sort_kw))],
        "groco_rows": [("", dict(sims=x, k=k, network="odd_even", distribution="cauchy",
                                 steepness=10.0))],
        "groco_rows_backward": [("", dict(grow=torch.ones(B, dtype=x.dtype), sims=x, k=k,
                                          network="odd_even", distribution="cauchy",
                                          steepness=10.0))],
        "groco_fused": [("", dict(anchor=anchor, negatives=negs, positives=pos, self_offset=0,
                                  k=k, network="odd_even", distribution="cauchy",
                                  steepness=10.0))],
        "groco_fused_backward": [("", dict(grow=torch.ones(B, dtype=x.dtype), sims=sims,
                                           index=index, negatives=negs, positives=pos, k=k,
                                           network="odd_even", distribution="cauchy",
                                           steepness=10.0))],
        "sinkhorn": [("", dict(scores=scores, epsilon=0.05, iterations=3,
                               gather_distributed=False))],
        "swav_cross_entropy": [("", dict(scores=scores, targets=torch.softmax(scores, 1),
                                         temperature=0.1, compute_grad=True))],
        "contrastive_lse_sum": [("", dict(a=ca, b=cb, self_col=c_self, pos_col=c_pos, scale=2.0,
                                          exclude_pos=True, subtract_pos=True, need_da=True,
                                          need_db=True))],
        "sce_stats": [("", dict(q=ca, k=ca * 0.5, cols=cb, self_col=c_self, scale_s=2.0,
                                scale_t=3.0, same_pass=True))],
    }
    c_funcs = {
        "soft_sort_forward": [x, net_n, *dist, True],
        "soft_sort_backward": [torch.randn_like(y), torch.randn_like(Pm), saved, net_n, *dist],
        "groco_rows_forward": [x, k, net_n, *dist],
        "groco_rows_backward": [torch.ones(B, dtype=x.dtype), x, k, net_n, *dist],
        "groco_fused_forward": [anchor, negs, pos, 0, k, net_f, *dist],
        "groco_fused_backward": [torch.ones(B, dtype=x.dtype), sims, index, negs, pos, k, net_f,
                                 *dist],
        "sinkhorn_colstats_cpu": [scores, 0.05],
        "sinkhorn_rowpass_cpu": [scores, 0.05, torch.zeros(7), True],
        "swav_cross_entropy_cpu": [scores, torch.softmax(scores, 1), 0.1, True],
        "swav_cross_entropy_scaled_cpu": [scores, torch.softmax(scores, 1), 0.1, True,
                                          torch.tensor([2.0])],
        "contrastive_lse_sum_cpu": [ca, cb, c_self, c_pos, 2.0, True, True, True, True],
        "contrastive_lse_forward_cpu": [ca, cb, c_self, c_pos, 2.0, 3, True, True, True],
        "contrastive_lse_backward_cpu": [ca, cb, c_self, c_pos, 2.0, 3, True, torch.zeros(5),
                                         torch.zeros(5), torch.zeros(6), torch.ones(5),
                                         torch.ones(5), torch.ones(6), True, True],
        "sce_grad_cpu": [ca, ca * 0.5, cb, c_self, 2.0, 3.0],
    }
    # calls that once corrupted memory or returned garbage: each must raise
    i32 = torch.int32
    must_raise = [
        ("op", "soft_sort_backward", "grad of wrong width",
         dict(gy=torch.randn(B, n + 3, dtype=x.dtype), gP=x.new_empty(0), d=saved, n=n, **sort_kw)),
        ("op", "soft_sort_backward", "grad of fewer rows",
         dict(gy=torch.randn(1, n, dtype=x.dtype), gP=x.new_empty(0), d=saved, n=n, **sort_kw)),
        ("op", "soft_sort_backward", "grad_P of wrong size",
         dict(gy=torch.randn_like(y), gP=torch.randn(B, n - 1, n - 1, dtype=x.dtype), d=saved,
              n=n, **sort_kw)),
        ("op", "soft_sort_backward", "narrow grad",
         dict(gy=torch.randn(B, 2, dtype=x.dtype), gP=x.new_empty(0), d=saved, n=n, **sort_kw)),
        ("op", "groco_fused", "negatives of another D",
         dict(anchor=anchor, negatives=torch.randn(N, D + 3, dtype=x.dtype), positives=pos,
              self_offset=0, k=k, network="odd_even", distribution="cauchy", steepness=10.0)),
        ("op", "groco_fused", "too few positive rows",
         dict(anchor=anchor, negatives=negs, positives=torch.randn(P, 1, D, dtype=x.dtype),
              self_offset=0, k=k, network="odd_even", distribution="cauchy", steepness=10.0)),
        ("op", "groco_fused", "self_offset past the negatives",
         dict(anchor=anchor, negatives=negs, positives=pos, self_offset=N, k=k,
              network="odd_even", distribution="cauchy", steepness=10.0)),
        ("op", "groco_fused", "negative self_offset",
         dict(anchor=anchor, negatives=negs, positives=pos, self_offset=-1, k=k,
              network="odd_even", distribution="cauchy", steepness=10.0)),
        ("op", "groco_fused_backward", "index out of range",
         dict(grow=torch.ones(B, dtype=x.dtype), sims=sims, index=index + N, negatives=negs,
              positives=pos, k=k, network="odd_even", distribution="cauchy", steepness=10.0)),
        ("op", "groco_rows", "k = 0", dict(sims=x, k=0, network="odd_even",
                                           distribution="cauchy", steepness=10.0)),
        ("op", "groco_rows", "k = n", dict(sims=x, k=n, network="odd_even",
                                           distribution="cauchy", steepness=10.0)),
        ("op", "groco_rows", "k < 0", dict(sims=x, k=-2, network="odd_even",
                                           distribution="cauchy", steepness=10.0)),
        ("c", "soft_sort_forward", "wire out of range",
         [x, torch.tensor([[0], [n + 5], [0], [n + 5]], dtype=i32), *dist, True]),
        ("c", "soft_sort_forward", "comparator writing a foreign wire",
         [x, torch.tensor([[0], [1], [2], [1]], dtype=i32), *dist, True]),
        ("c", "groco_rows_forward", "network of a longer row",
         [x, k, network_tensor("odd_even", n + 4, torch.device("cpu")), *dist]),
        ("c", "soft_sort_backward", "saved of wrong width",
         [torch.randn_like(y), torch.randn_like(Pm), saved[:, :5], net_n, *dist]),
    ]
    return ops, c_funcs, must_raise


def _with_backends(schema, kwargs):
    """One call per CPU backend name where the op takes a backend."""
    if "backend" not in {a.name for a in schema.arguments}:
        return [kwargs]
    return [dict(kwargs, backend=b) for b in CPU_BACKENDS]


def _mutations(kwargs, int_bases=None):
    """(label, kwargs) with one argument malformed at a time."""
    out = [("valid", kwargs)]
    for name, v in kwargs.items():
        if hasattr(v, "shape") and hasattr(v, "dtype"):
            muts = _tensor_variants(v)
        elif isinstance(v, bool):
            muts = [("flip", not v)]
        elif isinstance(v, int):
            muts = _int_variants(v)
        elif isinstance(v, float):
            muts = _float_variants(v)
        elif isinstance(v, list) and all(isinstance(e, float) for e in v):
            muts = [("empty_list", []), ("nan_list", [math.nan]), ("long_list", v * 8)]
        elif name == "distribution":
            muts = [(f"dist={d}", d) for d in DISTRIBUTIONS if d != v] + [("dist=bogus", "nope")]
        elif name == "network":
            muts = [("net=bitonic", "bitonic"), ("net=bogus", "nope")]
        elif v is None:
            muts = []
        else:
            muts = []
        out += [(f"{name}:{label}", dict(kwargs, **{name: m})) for label, m in muts]
    return out


def build_cases():
    """[(case id, kind, name, args, must_raise)]; kind 'op' calls torch.ops.fastssl.<name>
    with keyword arguments, 'c' calls fastssl._C.<name> positionally."""
    import torch
    import fastssl  # noqa: F401  (registers the ops)
    from fastssl import _C
    torch.manual_seed(0)
    ops, c_funcs, must_raise = _known_bases()
    cases = []
    op_names = sorted(n for n in dir(torch.ops.fastssl)
                      if isinstance(getattr(torch.ops.fastssl, n, None),
                                    torch._ops.OpOverloadPacket))
    for name in op_names:
        schema = getattr(torch.ops.fastssl, name).default._schema
        arg_names = {a.name for a in schema.arguments}
        bases = [("schema", _schema_base(schema))]
        for label, kw in ops.get(name, []):
            if set(kw) <= arg_names:  # still matches the schema: fill in new arguments
                full = _schema_base(schema)
                full.update(kw)
                bases.append(("known" + label, full))
        for blabel, base in bases:
            for kw in _with_backends(schema, base):
                for mlabel, args in _mutations(kw):
                    tag = f"{name}[{blabel}|{kw.get('backend', '-')}|{mlabel}]"
                    cases.append((tag, "op", name, args, False))
    for name, base in c_funcs.items():
        if not hasattr(_C, name):
            continue
        as_kw = {str(i): v for i, v in enumerate(base)}
        for mlabel, args in _mutations(as_kw):
            cases.append(
                (f"_C.{name}[{mlabel}]", "c", name, [args[str(i)] for i in range(len(base))], False)
            )
    for kind, name, label, args in must_raise:
        if kind == "op" and (not hasattr(torch.ops.fastssl, name) or not set(args) <= {
                a.name for a in getattr(torch.ops.fastssl, name).default._schema.arguments}):
            continue
        if kind == "c" and not hasattr(_C, name):
            continue
        if kind == "op":
            full = _schema_base(getattr(torch.ops.fastssl, name).default._schema)
            full.update(args)
            if "backend" in full:
                full["backend"] = "cpp"
            args = full
        cases.append((f"must_raise:{name}[{label}]", kind, name, args, True))
    return cases


def run_worker(start: int) -> None:
    """Run cases from `start`; print one JSON line per case before calling it, so the parent
    knows which case a signal interrupted."""
    import torch
    from fastssl import _C
    cases = build_cases()
    print(json.dumps({"total": len(cases)}), flush=True)
    for i in range(start, len(cases)):
        tag, kind, name, args, must_raise = cases[i]
        print(json.dumps({"start": i, "case": tag}), flush=True)
        try:
            if kind == "op":
                getattr(torch.ops.fastssl, name)(**args)
            else:
                getattr(_C, name)(*args)
            outcome = "returned"
        except Exception as e:  # noqa: BLE001  any Python exception is the safe outcome
            outcome = "raised " + type(e).__name__
        print(json.dumps({"done": i, "outcome": outcome, "must_raise": must_raise}), flush=True)


# ---------------------------------------------------------------------------------------------


def _run_all(timeout: float = 240.0):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    start, crashes, returned_bad, total, done = 0, [], [], None, 0
    while True:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", str(start)],
                              capture_output=True, text=True, env=env, timeout=timeout)
        last_started = None
        for line in proc.stdout.splitlines():
            if not line.startswith("{"):
                continue
            rec = json.loads(line)
            if "total" in rec:
                total = rec["total"]
            elif "start" in rec:
                last_started = rec
            elif "done" in rec:
                done += 1
                last_started = None
                if rec["must_raise"] and rec["outcome"] == "returned":
                    returned_bad.append(rec["done"])
        if proc.returncode == 0:
            return total, done, crashes, returned_bad
        if last_started is None:  # died outside a case (import, case building)
            raise AssertionError(f"worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        crashes.append((last_started["case"], proc.returncode, proc.stderr[-400:]))
        start = last_started["start"] + 1


def test_registered_ops_never_crash_the_process():
    total, done, crashes, returned_bad = _run_all()
    assert total and total > 500, f"too few cases built: {total}"
    report = "\n".join(f"{case}: rc {rc} ({'signal ' + signal.Signals(-rc).name if rc < 0 else ''})"
                       f" {err.strip()[-200:]}" for case, rc, err in crashes)
    assert not crashes, f"{len(crashes)} of {total} calls killed the process:\n{report}"
    assert not returned_bad, f"known-dangerous calls returned instead of raising: {returned_bad}"
    assert done == total


def test_known_dangerous_calls_name_the_argument():
    """The C++ checks say which argument is wrong (run in-process: they are checked, so safe)."""
    import torch
    import fastssl  # noqa: F401
    _, _, must_raise = _known_bases()
    expect = {"grad of wrong width": "grad_sorted", "grad of fewer rows": "grad_sorted",
              "narrow grad": "grad_sorted",
              "grad_P of wrong size": "grad_P", "negatives of another D": "negatives",
              "too few positive rows": "positives", "self_offset past the negatives": "self_offset",
              "negative self_offset": "self_offset", "index out of range": "index",
              # groco_rows: the op's entry check names k before the C++ kernel's own check
              "k = 0": "k: expected an int in [1, 5]", "k = n": "k: expected an int in [1, 5]",
              "k < 0": "k: expected an int in [1, 5]",
              "wire out of range": "network", "comparator writing a foreign wire": "network",
              "network of a longer row": "network", "saved of wrong width": "saved"}
    from fastssl import _C
    for kind, name, label, args in must_raise:
        if kind == "op":
            if name == "groco_rows" or name == "soft_sort_backward":
                args = dict(args, backend="cpp")
            call = lambda: getattr(torch.ops.fastssl, name)(**args)  # noqa: E731
        else:
            call = lambda: getattr(_C, name)(*args)  # noqa: E731
        with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
            call()
        assert expect[label] in str(info.value), (label, str(info.value))


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    run_worker(int(sys.argv[2]))
