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
