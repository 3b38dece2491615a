"""PNG plots of time and peak memory against batch size, one figure per (op, dtype, fixed shape
parameters): a time panel per mode (median, with the p20-p80 band as error bars) and a memory
panel (forward+backward where measured, else the first mode measured), one line per provider."""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

MODE_ORDER = ("forward", "backward", "forward+backward", "step")
ALL_PROVIDERS = ("fastssl", "fastssl:torch", "fastssl:cpp", "fastssl:triton", "fastssl:cuda",
                 "reference", "reference:compile", "diffsort", "eager", "eager:compile")


def _fixed_params(rec: dict) -> tuple:
    shape = rec.get("shape") or {}
    return tuple(sorted((k, v) for k, v in shape.items() if k != rec.get("x_key")))


def _file_name(op: str, dtype: str, fixed: tuple) -> str:
    params = "_".join(f"{k}{v}" for k, v in fixed)
    name = f"{op}_{dtype}" + (f"_{params}" if params else "")
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name) + ".png"


def make_plots(records: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        if (r.get("status") == "ok" and r.get("p50_ms") is not None and r.get("x") is not None
                and not r.get("probe")):
            groups[(r["op"], r["dtype"], _fixed_params(r))].append(r)

    written = []
    for (op, dtype, fixed), recs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        modes = [m for m in MODE_ORDER if any(r["mode"] == m for r in recs)]
        mem_mode = next((m for m in ("forward+backward", "step") if m in modes), modes[0])
        has_mem = any(r.get("peak_mem_mb") is not None for r in recs if r["mode"] == mem_mode)
        n_panels = len(modes) + (1 if has_mem else 0)
        fig, axes = plt.subplots(1, n_panels, figsize=(4.2 * n_panels, 3.6), squeeze=False)
        axes = axes[0]
        providers = sorted({r["provider"] for r in recs})
        # One colour per provider across all panels and figures.
        palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        color = {p: palette[ALL_PROVIDERS.index(p) % len(palette)] if p in ALL_PROVIDERS
                 else palette[(len(ALL_PROVIDERS) + i) % len(palette)] for i, p in enumerate(providers)}
        x_key = recs[0].get("x_key") or "x"
        for ax, mode in zip(axes, modes):
            for prov in providers:
                pts = sorted((r for r in recs if r["provider"] == prov and r["mode"] == mode), key=lambda r: r["x"])
                if not pts:
                    continue
                xs = [r["x"] for r in pts]
                ys = [r["p50_ms"] for r in pts]
                lo = [max(0.0, r["p50_ms"] - r.get("p20_ms", r["p50_ms"])) for r in pts]
                hi = [max(0.0, r.get("p80_ms", r["p50_ms"]) - r["p50_ms"]) for r in pts]
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=prov, color=color[prov])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"time, {mode}")
            ax.set_xlabel(x_key)
            ax.set_ylabel("ms (median, p20-p80)")
            ax.grid(True, which="both", alpha=0.3)
        if has_mem:
            ax = axes[-1]
            for prov in providers:
                pts = sorted((r for r in recs if r["provider"] == prov and r["mode"] == mem_mode
                              and r.get("peak_mem_mb") is not None), key=lambda r: r["x"])
                if pts:
                    ax.plot([r["x"] for r in pts], [max(r["peak_mem_mb"], 1e-3) for r in pts],
                            marker="o", label=prov, color=color[prov])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"peak memory, {mem_mode}")
            ax.set_xlabel(x_key)
            ax.set_ylabel("MiB above inputs")
            ax.grid(True, which="both", alpha=0.3)
        axes[0].legend(fontsize=7)
        device = recs[0].get("device_name") or recs[0].get("device", "")
        title = f"{op} ({dtype}" + "".join(f", {k}={v}" for k, v in fixed) + f") on {device}"
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = Path(out_dir) / _file_name(op, dtype, fixed)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
