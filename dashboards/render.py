#!/usr/bin/env python3
"""Plots each dashboard's panels from real query results, for the README.

Usage: render.py DATA_DIR PICTURES_DIR

DATA_DIR holds one <uid>.json per dashboard, written by the dashboard check
(`cargo xtask dashboards` runs it with DLM_DASHBOARD_DATA set): every panel's
queries as Prometheus range results over the last minute of a live workload.
Writes PICTURES_DIR/<uid>.png: the panels in Grafana's two-column layout.
"""

import json
import math
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def legend(template, labels):
    """Grafana's legend format: {{label}} replaced by the series' label."""
    if not template:
        return ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def points(series):
    xs, ys = [], []
    start = float(series["values"][0][0]) if series["values"] else 0.0
    for t, v in series["values"]:
        value = float(v)
        if math.isfinite(value):
            xs.append(float(t) - start)
            ys.append(value)
    return xs, ys


def plot_panel(ax, panel):
    ax.set_title(panel["title"], fontsize=9, loc="left")
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    unit = panel.get("unit") or ""
    if panel["type"] == "heatmap":
        rows = []
        for target in panel["targets"]:
            for series in target["result"] or []:
                le = series["metric"].get("le", "")
                xs, ys = points(series)
                if ys:
                    rows.append((float("inf") if le == "+Inf" else float(le), xs, ys))
        rows.sort(key=lambda r: r[0])
        if rows:
            width = min(len(r[2]) for r in rows)
            grid = [r[2][:width] for r in rows]
            ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis")
            ax.set_yticks(range(len(rows)))
            ax.set_yticklabels([("+Inf" if math.isinf(r[0]) else f"{r[0]:g}s") for r in rows], fontsize=6)
        ax.set_xlabel("seconds", fontsize=7)
        return
    drawn = 0
    for target in panel["targets"]:
        for series in target["result"] or []:
            xs, ys = points(series)
            if ys:
                ax.plot(xs, ys, linewidth=1.2, label=legend(target.get("legend"), series["metric"]))
                drawn += 1
    if drawn:
        ax.legend(fontsize=6, loc="upper left")
    ax.set_xlabel("seconds", fontsize=7)
    if unit:
        ax.set_ylabel(unit, fontsize=7)


def main():
    data_dir, pictures_dir = Path(sys.argv[1]), Path(sys.argv[2])
    pictures_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(data_dir.glob("*.json")):
        dashboard = json.loads(path.read_text())
        panels = dashboard["panels"]
        rows = (len(panels) + 1) // 2
        fig, axes = plt.subplots(rows, 2, figsize=(12, 2.6 * rows), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            plot_panel(ax, panel)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{dashboard['title']} (real data: a 2-node test cluster, one minute of test workload)", fontsize=11)
        fig.tight_layout()
        out = pictures_dir / f"{dashboard['uid']}.png"
        fig.savefig(out, dpi=80)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
