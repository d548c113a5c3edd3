"""The benchmark history: one JSON object per run in history.jsonl, and history.png drawn from it (each
figure over commits on one panel, each ratio to the peer measured in the same run on the other).

Runs of `streamtrain bench` hold flat keys (`convert_mb_per_s`, ...); older runs of benchmarks/run_all.py
hold one object per benchmark, read through LEGACY_PATHS so the plot spans both.
"""

from __future__ import annotations

import json
from pathlib import Path

from streamtrain.dataset import atomic_write_bytes

__all__ = ["FIGURES", "RATIOS", "read_history", "append_history", "record_script_run", "figure", "plot_history",
           "latest_run"]

# what the plot draws: key -> label
FIGURES = {
    "convert_mb_per_s": "convert MB/s",
    "loader_real_tokens_per_s": "loader real tokens/s",
    "train_real_tokens_per_s": "fit real tokens/s",
}
RATIOS = {
    "convert_vs_stdlib": "convert / stdlib json",
    "loader_vs_seed": "loader / seed-style",
    "loader_vs_memcpy": "loader / memcpy",
    "train_vs_seed": "fit / seed pipeline",
    "mfu": "fit MFU",
}
LEGACY_PATHS = {
    "convert_mb_per_s": ("convert", "convert_2w_mb_s"),
    "convert_vs_stdlib": ("convert", "speedup_2w"),
    "loader_real_tokens_per_s": ("loader", "results", "shardstream_w0", "real_tokens_per_s"),
    "loader_vs_seed": ("loader", "ratios", "best_shardstream_vs_seed"),
    "loader_vs_memcpy": ("loader", "ratios", "best_shardstream_vs_memcpy"),
    "train_real_tokens_per_s": ("train", "fit_real_tokens_per_s"),
    "train_vs_seed": ("train", "speedup"),
    "mfu": ("train", "fit_mfu"),
}


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_history(path: Path, entry: dict) -> None:
    """Append one line atomically: the file is rewritten beside itself and renamed, so a crash leaves either
    the old history or the new one, never half a line."""
    old = path.read_bytes() if path.exists() else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, old + (json.dumps(entry, allow_nan=False) + "\n").encode())


def record_script_run(benchmark: str, result: dict, path: Path | None = None) -> Path:
    """Append a benchmark script's result (`benchmark`: its name, e.g. "loader_remote") to the repository's
    history with the machine and commit it ran on; `streamtrain bench` runs are told apart by theirs."""
    import torch

    from streamtrain.bench.machine import machine_info

    path = path or Path(__file__).resolve().parents[2] / "benchmarks" / "history.jsonl"
    append_history(path, {"benchmark": benchmark, "machine": machine_info(torch.device("cpu")), **result})
    return path


def figure(entry: dict, key: str):
    """`key` of a run, from a `streamtrain bench` entry or through LEGACY_PATHS from an older one."""
    if key in entry:
        return entry[key]
    obj = entry
    for part in LEGACY_PATHS.get(key, ("\0",)):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def latest_run(history: list[dict], full_only: bool = True) -> dict | None:
    """The newest `streamtrain bench` run (not --quick when `full_only` and one exists)."""
    runs = [h for h in history if h.get("benchmark") == "bench"]
    full = [h for h in runs if not h.get("quick")]
    chosen = full if (full_only and full) else runs
    return chosen[-1] if chosen else None


def plot_history(history: list[dict], out: Path) -> bool:
    """Draw `out`; False (and nothing drawn) without matplotlib or history."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if not history:
        return False
    ticks = [(h.get("commit") or h.get("machine", {}).get("commit") or "")[:7] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, keys, title, log in ((left, FIGURES, "figures (log scale)", True),
                                 (right, RATIOS, "ratios to the peer or bound, same run", True)):
        for key, label in keys.items():
            points = [(i, figure(h, key)) for i, h in enumerate(history)]
            points = [(i, v) for i, v in points if isinstance(v, (int, float))]
            if points:
                ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=label)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.set_xticks(range(len(ticks)), ticks, rotation=60, fontsize=6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return True
