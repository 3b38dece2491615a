"""Benchmark output that people read (issue 15): curves rather than lone points, linear axes
where a log axis would blow up a small difference, bars for single sizes and the training step,
console lines never cut mid-word, and the automatic-vs-forced note of the summary."""

import pytest

from bench import __main__ as bench_main
from bench import harness, plots, summary

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _rec(op, provider, b, ms, mem, mode="forward+backward", **shape):
    return {"op": op, "family": "sortnet" if op == "soft_sort" else "contrastive",
            "provider": provider, "mode": mode, "shape": {"B": b, **shape}, "x": b, "x_key": "B",
            "dtype": "float32", "device": "cpu", "device_name": "test", "status": "ok",
            "p20_ms": ms * 0.9, "p50_ms": ms, "p80_ms": ms * 1.1, "peak_mem_mb": mem}


def test_log_only_for_wide_spans():
    assert not plots.use_log([100.0, 103.0])
    assert not plots.use_log([256, 1024, 4096])
    assert plots.use_log([0.5, 200.0])
    assert not plots.use_log([5.0])


def test_memory_difference_of_three_percent_stays_small_and_ticks_are_plain():
    recs = [_rec("nt_xent", p, b, ms * b / 256, mem * b / 256, D=8)
            for b in (256, 512, 1024) for p, ms, mem in (("fastssl", 2.0, 100.0),
                                                         ("reference", 3.0, 103.0))]
    fig = plots._line_figure(plt, "nt_xent", "float32", (("D", 8),), recs)
    time_ax, mem_ax = fig.axes[0], fig.axes[-1]
    assert mem_ax.get_yscale() == "linear" and mem_ax.get_ylim()[0] == 0
    assert time_ax.get_xscale() == "linear"  # 256..1024 spans 4x: linear
    assert len(time_ax.lines) >= 2  # curves
    fig.canvas.draw()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert labels and not any("times" in s or "^" in s for s in labels), labels
    plt.close(fig)


def test_single_size_is_bars_and_training_step_one_bar_figure(tmp_path):
    recs = [
        _rec("info_nce", p, 1024, ms, 10.0, D=8) for p, ms in (("fastssl", 2.0), ("reference", 3.0))
    ]
    fig = plots._line_figure(plt, "info_nce", "float32", (("D", 8),), recs)
    assert all(len(ax.patches) == 2 and not ax.lines for ax in fig.axes)
    plt.close(fig)
    steps = []
    for method in ("simclr", "groco", "swav"):
        for p, ms in (("fastssl", 200.0), ("reference", 300.0)):
            r = _rec("train_step", p, 32, ms, 70.0, mode="step", method=method, arch="resnet18",
                     res=32, views=2)
            r["images_per_s"] = 64000 / ms
            steps.append(r)
    written = plots.make_plots(recs + steps, tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["info_nce_float32_D8.png", "train_step_float32_archresnet18_res32_views2.png"]
    fig, _ = plots._step_figure(plt, "float32", steps)
    assert [len(ax.patches) for ax in fig.axes] == [6, 6, 6]
    plt.close(fig)


def test_console_note_is_cut_at_a_word(capsys):
    note = " ".join(f"word{i:03d}" for i in range(60))
    bench_main._progress({"op": "nt_xent", "provider": "fastssl:cpp", "shape": {"B": 4},
                          "dtype": "float32", "mode": "forward", "status": "unsupported",
                          "note": note})
    line = capsys.readouterr().err.strip()
    shown = line.split("[unsupported] ", 1)[1]
    assert shown.endswith(" ...") and len(shown) <= 100
    assert all(w in note.split() for w in shown[:-4].split())
    err = harness.failure_note(RuntimeError("x" * 10 + " " + "long words here " * 40))
    assert len(err) <= 300 and err.endswith(" ...") and "here" in err.split()[-2]


def test_summary_headline_uses_the_automatic_backend_and_explains_the_forced_twin():
    shape = {"n": 16, "network": "odd_even"}
    recs = [_rec("soft_sort", p, 1024, ms, 4.0, **shape)
            for p, ms in (("fastssl", 5.52), ("fastssl:cpp", 9.06), ("diffsort", 209.0),
                          ("reference", 169.6))]
    target = next(t for t in summary.TARGETS if t.device == "cpu" and t.op == "soft_sort")
    assert target.provider == "fastssl"
    assert summary.auto_backend("soft_sort", "sortnet", "cpu") == "cpp"
    verdict, detail = summary.evaluate_target(recs, target)
    assert verdict == "met" and "5.52 ms" in detail
    note = summary.same_code_note(recs)
    assert "same code as `fastssl:cpp`" in note and "1.64x" in note
    text = summary.build_summary(recs)
    assert note in text


@pytest.mark.parametrize("spec", [s for s in bench_main.all_specs() if s.name != "train_step"],
                         ids=lambda s: s.name)
def test_every_series_is_a_curve(spec):
    """Quick runs: two sizes per series; CPU runs: at least three in forward+backward."""
    for quick, least in ((True, 2), (False, 3)):
        mode = "forward+backward" if "forward+backward" in spec.modes else spec.modes[0]
        series = {}
        for size in spec.sizes("cpu", quick):
            if size.modes is not None and mode not in size.modes:
                continue
            fixed = tuple(sorted((k, v) for k, v in size.shape.items() if k != spec.x_key))
            series.setdefault(fixed, set()).add(size.shape[spec.x_key])
        assert series and all(len(xs) >= least for xs in series.values()), (quick, series)
