"""bench.compare: ratios against eager and the fastest finite peer, and the issue-18 verdict."""
from bench import compare


def _rec(op, provider, ms, mem, B=2048, **extra):
    return {"op": op, "provider": provider, "shape": {"B": B, "D": 128}, "dtype": "float32",
            "mode": "forward+backward", "status": "ok", "p50_ms": ms, "peak_mem_mb": mem, **extra}


def test_ratios_and_verdicts():
    recs = [
        _rec("nt_xent", "fastssl", 100.0, 10.0),
        _rec("nt_xent", "eager", 150.0, 100.0),
        _rec("nt_xent", "peer:lightly", 300.0, 120.0),
        _rec("nt_xent", "peer:other", 200.0, 1.0),
        _rec("dcl", "fastssl", 100.0, 20.0),
        _rec("dcl", "eager", 90.0, 100.0),
    ]
    rows = {r["op"]: r for r in compare.compare_rows(recs)}
    nt = rows["nt_xent"]
    assert abs(nt["vs_eager"] - 1.5) < 1e-12 and abs(nt["vs_peer"] - 2.0) < 1e-12
    assert nt["peer"]["provider"] == "peer:other"
    assert compare._verdict(nt) == "met"
    assert compare._verdict(rows["dcl"]) == "NOT met: slower than eager, memory > 1/8 of eager"


def test_nan_peers_are_not_ranked():
    recs = [
        _rec("sinkhorn", "fastssl", 100.0, 10.0),
        _rec("sinkhorn", "eager", 50.0, 10.0, finite=False),
        _rec("sinkhorn", "peer:lightly", 40.0, 10.0, finite=False),
    ]
    (row,) = compare.compare_rows(recs)
    assert row["peer"] is None and row["eager"] is None and row["nan"] == ["eager", "peer:lightly"]
    assert compare._verdict(row) == "met"
    assert "NaN codes" in compare.compare_markdown(recs)


def test_model_flop():
    assert compare.model_flop("nt_xent", {"B": 4, "D": 2}, "forward+backward") == 2 * 2 * 8 * 8 * 2
    assert compare.model_flop("info_nce", {"B": 4, "D": 2}, "forward+backward") == 3 * 2 * 4 * 4 * 2


def test_target_range_counts_the_batch_per_view(monkeypatch):
    """N = B per view for every op with a range (issue 18's "N per view"); ops without a range
    count every size; TWO_VIEW_OPS switches an op to 2B anchors."""
    assert not compare.in_target_range({"op": "nt_xent", "shape": {"B": 1024}})
    assert compare.in_target_range({"op": "nt_xent", "shape": {"B": 2048}})
    assert not compare.in_target_range({"op": "info_nce", "shape": {"B": 1024}})
    assert compare.in_target_range({"op": "sce", "shape": {"B": 2048, "K": 16384}})
    assert compare.in_target_range({"op": "swav", "shape": {"B": 256}})
    monkeypatch.setattr(compare, "TWO_VIEW_OPS", ("nt_xent",))
    assert compare.in_target_range({"op": "nt_xent", "shape": {"B": 1024}})


def test_torchsort_note_appears_with_its_records():
    recs = [_rec("soft_sort", p, ms, 1.0) for p, ms in (("fastssl", 1.0), ("peer:torchsort", 2.0))]
    md = compare.compare_markdown(recs)
    assert "## Notes" in md and "permutahedron" in md and "no permutation matrix" in md
    assert "permutahedron" not in compare.compare_markdown(recs[:1])


def test_providers_are_interleaved_and_keep_outputs_alive():
    """Issue 25: call k of every provider before call k+1 of any, and the previous call's
    output alive (as a training loop keeps it) while the next one runs."""
    import weakref

    import torch

    from bench import harness

    order, alive_at_call = [], []
    last = {}

    def build(provider, shape, dtype, device):
        x = torch.ones(3, requires_grad=True)

        def forward():
            order.append(provider)
            alive_at_call.append(provider in last and last[provider]() is not None)
            out = (x * 2).sum()
            last[provider] = weakref.ref(out)
            return out
        return harness.Prepared(forward=forward, backward=torch.Tensor.backward, leaves=(x,))

    spec = harness.OpSpec("toy", "toy", build, lambda d, q: [], modes=("forward+backward",))
    cfg = harness.BenchConfig(warmup=1, min_reps=4, max_reps=4, min_time_s=0.0)
    recs = list(harness.run_group(spec, ("fastssl", "eager"), harness.Size({"B": 1}), torch.float32,
                                  torch.device("cpu"), cfg))
    assert [r["status"] for r in recs] == ["ok", "ok"] and all(r["reps"] == 4 for r in recs)
    timed = order[-8:]
    assert timed == ["fastssl", "eager"] * 4, order
    assert all(alive_at_call[-6:]), alive_at_call


def test_time_per_gflop_jump_is_flagged():
    recs = [_rec("nt_xent", p, ms, 1.0, B=b) for b, f, e in ((1024, 10.0, 20.0),
                                                              (2048, 40.0, 80.0),
                                                              (4096, 400.0, 320.0))
            for p, ms in (("fastssl", f), ("eager", e))]
    rows = {r["shape"]["B"]: r for r in compare.compare_rows(recs)}
    assert "jump" not in rows[2048] and rows[4096]["jump"][1] == 2048
    assert abs(rows[4096]["jump"][0] - 2.5) < 1e-9
    md = compare.compare_markdown(recs)
    assert "JUMP x2.5 from B=2048" in md and "ms/GFLOP" in md


def test_largest_plan_keeps_each_series_largest_size():
    from bench import __main__ as bench_main
    from bench import contrastive, sphere

    nt = next(s for s in contrastive.SPECS if s.name == "nt_xent")
    cases, _ = bench_main.plan_cases(nt, "cpu", False, ["fastssl,eager"], None, None, True)
    got = {(p, s.shape["B"], m) for p, s, _, modes in cases for m in modes}
    assert ("fastssl", 8192, "forward+backward") in got and ("eager", 1024, "forward") in got
    assert not any(b in (2048, 4096) for _, b, _ in got)
    auh = next(s for s in sphere.SPECS if s.name == "auh")
    cases, _ = bench_main.plan_cases(auh, "cpu", False, ["fastssl"], None, ["forward"], True)
    assert [(s.shape, modes) for _, s, _, modes in cases] == [({"B": 512, "D": 1024},
                                                                ("forward",))]


def test_environment_records_thp_and_block_config():
    import torch

    from bench import results

    env = results.environment(torch.device("cpu"))
    assert {"thp_enabled", "thp_defrag", "cpp_block_config", "cpu_count"} <= set(env)
