"""The demo's chart: each backend's share of the traffic, phase by phase, as a PNG.

matplotlib with the Agg backend (no display needed), imported only here and
only when a chart is drawn.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    """One phase of the chart: its label, what was counted, and the count per backend."""

    label: str
    counts: dict[str, int]


def draw(bars: list[Bar], path: str | os.PathLike, title: str, subtitle: str = "") -> None:
    """Write a grouped bar chart (one group per phase, one bar per backend) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({b for bar in bars for b in bar.counts}, key=lambda b: (len(b), b))
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(bars) + 3), 5.5), dpi=110)
    try:
        for i, backend in enumerate(backends):
            shares = []
            for bar in bars:
                total = sum(bar.counts.values())
                shares.append(100.0 * bar.counts.get(backend, 0) / total if total else 0.0)
            xs = [x + (i - (len(backends) - 1) / 2) * width for x in range(len(bars))]
            rects = ax.bar(xs, shares, width, label=backend)
            ax.bar_label(rects, labels=[f"{s:.0f}" for s in shares], fontsize=7, padding=1)
        ax.set_xticks(range(len(bars)), [bar.label for bar in bars], rotation=30, ha="right")
        ax.set_ylabel("share of the phase's traffic (%)")
        ax.set_xlabel("phase")
        ax.set_ylim(0, 105)
        ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
        ax.legend(title="backend", loc="upper right")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
