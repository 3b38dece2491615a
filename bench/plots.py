"""PNG plots of time and peak memory against batch size, one figure per (op, dtype, fixed shape
parameters): a time panel per mode (median, with the p20-p80 band as error bars) and a memory
panel (forward+backward where measured, else the first mode measured), one line per provider.

Readability rules (issue 15): a series of several sizes is a line; a figure whose providers
were measured at one size only, and the training step (one figure for all methods), are bar
charts, never lone points on log axes. An axis is logarithmic only when its values span more
than LOG_SPAN (so that a 3 % memory difference is not blown up to fill the panel; linear axes
start at 0), and ticks are plain numbers (no "4x10^0")."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

MODE_ORDER = ("forward", "backward", "forward+backward", "step")
ALL_PROVIDERS = ("fastssl", "fastssl:torch", "fastssl:cpp", "fastssl:triton", "fastssl:cuda",
                 "reference", "reference:compile", "diffsort", "eager", "eager:compile",
                 "peer:lightly", "peer:torchsort")
LOG_SPAN = 20.0


def _fixed_params(rec: dict) -> tuple:
    shape = rec.get("shape") or {}
    return tuple(sorted((k, v) for k, v in shape.items() if k != rec.get("x_key")))


def _file_name(op: str, dtype: str, fixed: tuple) -> str:
    params = "_".join(f"{k}{v}" for k, v in fixed)
    name = f"{op}_{dtype}" + (f"_{params}" if params else "")
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name) + ".png"


def use_log(values) -> bool:
    """Log scale only when the positive values span more than LOG_SPAN."""
    vals = [v for v in values if v is not None and v > 0]
    return len(vals) >= 2 and max(vals) / min(vals) > LOG_SPAN


def _plain_ticks(axis) -> None:
    from matplotlib.ticker import FuncFormatter

    def fmt(v, _pos):
        if v == 0:
            return "0"
        if abs(v) >= 100 or float(v).is_integer():
            return f"{v:,.0f}"
        return f"{v:.3g}"
    axis.set_major_formatter(FuncFormatter(fmt))
    axis.set_minor_formatter(FuncFormatter(lambda v, _pos: ""))


def _scale(ax, which: str, values) -> None:
    axis = ax.xaxis if which == "x" else ax.yaxis
    if use_log(values):
        (ax.set_xscale if which == "x" else ax.set_yscale)("log", base=2 if which == "x" else 10)
    elif which == "y":
        ax.set_ylim(bottom=0, top=max([v for v in values if v is not None] + [0]) * 1.15 or 1)
    _plain_ticks(axis)


def _colors(plt, providers):
    # The default cycle has 10 colours; the peers (providers 11 and 12) get two of their own
    # rather than wrapping onto fastssl's.
    palette = list(plt.rcParams["axes.prop_cycle"].by_key()["color"]) + ["#000000", "#b8860b"]
    # One colour per provider across all panels and figures.
    return {p: palette[ALL_PROVIDERS.index(p) % len(palette)] if p in ALL_PROVIDERS
            else palette[(len(ALL_PROVIDERS) + i) % len(palette)] for i, p in enumerate(providers)}


def _bars(ax, categories, providers, value, color, ylabel, title):
    """Grouped bars: one group per category, one bar per provider; value(cat, prov) or None."""
    width = 0.8 / max(1, len(providers))
    values = []
    for j, prov in enumerate(providers):
        xs, ys = [], []
        for i, cat in enumerate(categories):
            v = value(cat, prov)
            if v is not None:
                xs.append(i + (j - (len(providers) - 1) / 2) * width)
                ys.append(v)
        if xs:
            ax.bar(xs, ys, width=width, label=prov, color=color[prov])
            values += ys
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, fontsize=7, rotation=20 if len(categories) > 3 else 0)
    _scale(ax, "y", values)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)


def _ordered(providers):
    return sorted(
        providers, key=lambda p: (ALL_PROVIDERS.index(p) if p in ALL_PROVIDERS else 99, p)
    )


def _line_figure(plt, op, dtype, fixed, recs):
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in recs)]
    mem_mode = next((m for m in ("forward+backward", "step") if m in modes), modes[0])
    has_mem = any(r.get("peak_mem_mb") is not None for r in recs if r["mode"] == mem_mode)
    n_panels = len(modes) + (1 if has_mem else 0)
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.6), squeeze=False)
    axes = axes[0]
    providers = _ordered({r["provider"] for r in recs})
    color = _colors(plt, providers)
    x_key = recs[0].get("x_key") or "x"
    several = len({r["x"] for r in recs}) > 1
    for ax, mode in zip(axes, modes):
        if not several:  # one size: bars per provider
            _bars(ax, [f"{x_key}={recs[0]['x']}"], providers,
                  lambda c, p: next((r["p50_ms"] for r in recs if r["provider"] == p
                                     and r["mode"] == mode), None),
                  color, "ms (median)", f"time, {mode}")
            continue
        xs_all, ys_all = [], []
        for prov in providers:
            pts = sorted((r for r in recs if r["provider"] == prov and r["mode"] == mode),
                         key=lambda r: r["x"])
            if not pts:
                continue
            xs = [r["x"] for r in pts]
            ys = [r["p50_ms"] for r in pts]
            lo = [max(0.0, r["p50_ms"] - r.get("p20_ms", r["p50_ms"])) for r in pts]
            hi = [max(0.0, r.get("p80_ms", r["p50_ms"]) - r["p50_ms"]) for r in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=prov, color=color[prov])
            xs_all += xs
            ys_all += [y + h for y, h in zip(ys, hi)]
        _scale(ax, "x", xs_all)
        _scale(ax, "y", ys_all)
        ax.set_title(f"time, {mode}")
        ax.set_xlabel(x_key)
        ax.set_ylabel("ms (median, p20-p80)")
        ax.grid(True, which="both", alpha=0.3)
    if has_mem:
        ax = axes[-1]
        mem = [r for r in recs if r["mode"] == mem_mode and r.get("peak_mem_mb") is not None]
        if not several:
            _bars(ax, [f"{x_key}={recs[0]['x']}"], providers,
                  lambda c, p: next((r["peak_mem_mb"] for r in mem if r["provider"] == p), None),
                  color, "MiB above inputs", f"peak memory, {mem_mode}")
        else:
            xs_all, ys_all = [], []
            for prov in providers:
                pts = sorted((r for r in mem if r["provider"] == prov), key=lambda r: r["x"])
                if pts:
                    ax.plot([r["x"] for r in pts], [r["peak_mem_mb"] for r in pts],
                            marker="o", label=prov, color=color[prov])
                    xs_all += [r["x"] for r in pts]
                    ys_all += [r["peak_mem_mb"] for r in pts]
            _scale(ax, "x", xs_all)
            _scale(ax, "y", ys_all)
            ax.set_title(f"peak memory, {mem_mode}")
            ax.set_xlabel(x_key)
            ax.set_ylabel("MiB above inputs")
            ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def _step_figure(plt, dtype, recs):
    """The training step: bars of step time, images/s and peak memory, one group per method."""
    def label(r):
        shape = r.get("shape") or {}
        return str(shape.get("method", "")) + "".join(
            f" {k}={v}"
            for k, v in sorted(shape.items())
            if k not in ("method", "arch", "res", "views")
        )

    categories = list(dict.fromkeys(label(r) for r in recs))
    providers = _ordered({r["provider"] for r in recs})
    color = _colors(plt, providers)
    panels = [
        ("p50_ms", "ms (median)", "time per step"),
        ("images_per_s", "images / s", "throughput"),
        ("peak_mem_mb", "MiB above inputs", "peak memory"),
    ]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in recs)]
    # one panel per row: the method names stay readable under their bars
    fig, axes = plt.subplots(
        len(panels),
        1,
        figsize=(max(5.0, 0.9 * len(categories) + 2), 3.0 * len(panels)),
        squeeze=False,
    )
    axes = axes.T
    for ax, (key, ylabel, title) in zip(axes[0], panels):
        _bars(
            ax,
            categories,
            providers,
            lambda c, p: next(
                (r.get(key) for r in recs if r["provider"] == p and label(r) == c), None
            ),
            color,
            ylabel,
            title,
        )
    axes[0][0].legend(fontsize=7)
    shape = recs[0].get("shape") or {}
    fixed = tuple((k, shape[k]) for k in ("arch", "res", "views") if k in shape)
    return fig, fixed


def make_plots(records: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = defaultdict(list)
    steps: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if (r.get("status") == "ok" and r.get("p50_ms") is not None and r.get("x") is not None
                and not r.get("probe")):
            if r["op"] == "train_step":
                steps[r["dtype"]].append(r)
            else:
                groups[(r["op"], r["dtype"], _fixed_params(r))].append(r)

    written = []
    device = next((r.get("device_name") or r.get("device", "") for r in records), "")
    figures = [(op, dtype, fixed, _line_figure(plt, op, dtype, fixed, recs))
               for (op, dtype, fixed), recs in sorted(groups.items(), key=lambda kv: str(kv[0]))]
    for dtype, recs in sorted(steps.items()):
        fig, fixed = _step_figure(plt, dtype, recs)
        figures.append(("train_step", dtype, fixed, fig))
    for op, dtype, fixed, fig in figures:
        title = f"{op} ({dtype}" + "".join(f", {k}={v}" for k, v in fixed) + f") on {device}"
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / _file_name(op, dtype, fixed)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
