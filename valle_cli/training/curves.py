"""curves.png: the training log drawn as loss and top-1 accuracy per task, by step."""

from __future__ import annotations

import os
from pathlib import Path

from valle_cli.formats import CURVES_FILE, atomic_path, read_log


def plot_curves(run: str | os.PathLike[str]) -> Path | None:
    """run/curves.png from run/log.jsonl: training loss per task (and validation loss), top-1 accuracy per task.

    Returns the path, or None when the log is empty or missing."""
    run = Path(run)
    records = read_log(run)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for split, style in (("train", "-"), ("val", "o--")):
        rows = [r for r in records if r.get("split") == split]
        names = sorted({name for r in rows for name in r.get("tasks", {})})
        for name in names:
            points = [(r["step"], r["tasks"][name]) for r in rows if name in r.get("tasks", {})]
            steps = [s for s, _ in points]
            ax_loss.plot(steps, [t["loss"] for _, t in points], style, label=f"{split} {name}", markersize=3)
            if name != "align":  # guided attention's penalty has no accuracy
                ax_acc.plot(steps, [t["acc"] for _, t in points], style, label=f"{split} {name}", markersize=3)
    ax_loss.set(xlabel="step", ylabel="cross-entropy", title="loss per task", yscale="log")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="accuracy per task")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = run / CURVES_FILE
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
