"""PNG plots of time and peak memory against batch size, one figure per (op, dtype, fixed shape):
a time panel per mode (median, p20-p80 error bars) and a memory panel, one line per provider.
Readability (issue 15): several sizes are lines; one size, and the training step, are bars; an
axis is logarithmic only when its values span more than LOG_SPAN (linear axes start at 0), and
ticks are plain numbers."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

MODE_ORDER = ("forward", "backward", "forward+backward", "step")
ALL_PROVIDERS = ("fastssl", "fastssl:torch", "fastssl:cpp", "fastssl:triton", "fastssl:cuda",
                 "reference", "reference:compile", "diffsort", "eager", "eager:compile",
                 "peer:lightly", "peer:torchsort")
LOG_SPAN = 20.0


def use_log(values) -> bool:
    """Log scale only when the positive values span more than LOG_SPAN."""
    vals = [v for v in values if v is not None and v > 0]
    return len(vals) >= 2 and max(vals) / min(vals) > LOG_SPAN


def _style(ax, title, xlabel, ylabel, xs, ys, grid_axis="both") -> None:
    from matplotlib.ticker import FuncFormatter
    plain = FuncFormatter(lambda v, _: "0" if v == 0 else f"{v:,.0f}"
                          if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}")
    for which, values in (("x", xs), ("y", ys)):
        axis = ax.xaxis if which == "x" else ax.yaxis
        if values is None:   # categories
            continue
        if use_log(values):
            getattr(ax, f"set_{which}scale")("log", base=2 if which == "x" else 10)
        elif which == "y":
            ax.set_ylim(bottom=0, top=max([v for v in values if v is not None] + [0]) * 1.15 or 1)
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", axis=grid_axis, alpha=0.3)


def _colors(plt, providers) -> dict:
    # One colour per provider across all figures; the peers (11, 12) get two of their own
    # rather than wrapping onto fastssl's.
    palette = list(plt.rcParams["axes.prop_cycle"].by_key()["color"]) + ["#000000", "#b8860b"]
    return {p: palette[(ALL_PROVIDERS.index(p) if p in ALL_PROVIDERS else len(ALL_PROVIDERS) + i)
                       % len(palette)] for i, p in enumerate(providers)}


def _ordered(providers) -> list:
    return sorted(providers, key=lambda p: (ALL_PROVIDERS.index(p) if p in ALL_PROVIDERS else 99,
                                            p))


def _bars(ax, categories, providers, value, color, ylabel, title):
    """Grouped bars: one group per category, one bar per provider; value(cat, prov) or None."""
    width, values = 0.8 / max(1, len(providers)), []
    for j, prov in enumerate(providers):
        pts = [(i + (j - (len(providers) - 1) / 2) * width, v) for i, c in enumerate(categories)
               if (v := value(c, prov)) is not None]
        if pts:
            ax.bar([x for x, _ in pts], [v for _, v in pts], width=width, label=prov,
                   color=color[prov])
            values += [v for _, v in pts]
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, fontsize=7, rotation=20 if len(categories) > 3 else 0)
    _style(ax, title, "", ylabel, None, values, grid_axis="y")


def _line_figure(plt, op, dtype, fixed, recs):
    modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in recs)]
    mem_mode = next((m for m in ("forward+backward", "step") if m in modes), modes[0])
    panels = [(m, "p50_ms", f"time, {m}", "ms (median)") for m in modes]
    if any(r.get("peak_mem_mb") is not None for r in recs if r["mode"] == mem_mode):
        panels.append((mem_mode, "peak_mem_mb", f"peak memory, {mem_mode}", "MiB above inputs"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    providers = _ordered({r["provider"] for r in recs})
    color = _colors(plt, providers)
    x_key = recs[0].get("x_key") or "x"
    for ax, (mode, key, title, ylabel) in zip(axes[0], panels):
        sel = [r for r in recs if r["mode"] == mode and r.get(key) is not None]
        if len({r["x"] for r in recs}) == 1:  # one size: bars per provider
            _bars(ax, [f"{x_key}={recs[0]['x']}"], providers, lambda c, p: next(
                (r[key] for r in sel if r["provider"] == p), None), color, ylabel, title)
            continue
        xs_all, ys_all = [], []
        for prov in providers:
            pts = sorted((r for r in sel if r["provider"] == prov), key=lambda r: r["x"])
            if not pts:
                continue
            xs, ys = [r["x"] for r in pts], [r[key] for r in pts]
            if key == "p50_ms":
                lo = [max(0.0, r["p50_ms"] - r.get("p20_ms", r["p50_ms"])) for r in pts]
                hi = [max(0.0, r.get("p80_ms", r["p50_ms"]) - r["p50_ms"]) for r in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=prov,
                            color=color[prov])
                ys = [y + h for y, h in zip(ys, hi)]
            else:
                ax.plot(xs, ys, marker="o", label=prov, color=color[prov])
            xs_all, ys_all = xs_all + xs, ys_all + ys
        _style(ax, title, x_key, "ms (median, p20-p80)" if key == "p50_ms" else ylabel, xs_all,
               ys_all)
    axes[0][0].legend(fontsize=7)
    return fig


def _step_figure(plt, dtype, recs):
    """The training step: bars of step time, images/s and peak memory, one group per method."""
    def label(r):
        shape = r.get("shape") or {}
        return str(shape.get("method", "")) + "".join(
            f" {k}={v}" for k, v in sorted(shape.items()) if k not in ("method", "arch", "res",
                                                                       "views"))
    categories = list(dict.fromkeys(label(r) for r in recs))
    providers = _ordered({r["provider"] for r in recs})
    color = _colors(plt, providers)
    panels = [p for p in (("p50_ms", "ms (median)", "time per step"),
                          ("images_per_s", "images / s", "throughput"),
                          ("peak_mem_mb", "MiB above inputs", "peak memory"))
              if any(r.get(p[0]) is not None for r in recs)]
    # one panel per row: the method names stay readable under their bars
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(max(5.0, 0.9 * len(categories) + 2), 3.0 * len(panels)))
    for ax, (key, ylabel, title) in zip(axes[:, 0], panels):
        _bars(ax, categories, providers, lambda c, p: next(
            (r.get(key) for r in recs if r["provider"] == p and label(r) == c), None),
            color, ylabel, title)
    axes[0][0].legend(fontsize=7)
    shape = recs[0].get("shape") or {}
    return fig, tuple((k, shape[k]) for k in ("arch", "res", "views") if k in shape)


def make_plots(records: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if (r.get("status") == "ok" and r.get("p50_ms") is not None and r.get("x") is not None
                and not r.get("probe")):
            fixed = () if r["op"] == "train_step" else tuple(sorted(
                (k, v) for k, v in (r.get("shape") or {}).items() if k != r.get("x_key")))
            groups[(r["op"], r["dtype"], fixed)].append(r)
    device = next((r.get("device_name") or r.get("device", "") for r in records), "")
    written = []
    for (op, dtype, fixed), recs in sorted(groups.items(), key=lambda kv: (
            kv[0][0] == "train_step", str(kv[0]))):
        if op == "train_step":
            fig, fixed = _step_figure(plt, dtype, recs)
        else:
            fig = _line_figure(plt, op, dtype, fixed, recs)
        fig.suptitle(f"{op} ({dtype}" + "".join(f", {k}={v}" for k, v in fixed) + f") on {device}",
                     fontsize=10)
        fig.tight_layout()
        name = f"{op}_{dtype}" + "".join(f"_{k}{v}" for k, v in fixed)
        path = Path(out_dir) / (re.sub(r"[^A-Za-z0-9_.+-]+", "-", name) + ".png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
