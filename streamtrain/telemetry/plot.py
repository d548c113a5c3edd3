"""RUN/loss.png: training loss and validation loss against step."""

from __future__ import annotations

import os
from pathlib import Path

from streamtrain.telemetry.log import read_metrics

__all__ = ["plot_loss"]


def plot_loss(run_dir: str | os.PathLike) -> str:
    """Write RUN/loss.png (training loss and validation MSE against step); return a line saying what was done."""
    run_dir = Path(run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "loss plot skipped: matplotlib is not installed (pip install 'streamtrain[plot]')"
    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train and not val:
        return "loss plot skipped: nothing was logged"
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss (standardized MSE)")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss (standardized MSE)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / "loss.png"
    tmp = run_dir / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return f"loss plot: {out}"
