"""What a benchmark ran on: CPU model and cores, torch, the device, and the commit of the code measured."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

__all__ = ["cpu_model", "git_commit", "machine_info"]


def cpu_model(cpuinfo: str | None = None) -> str:
    """The 'model name' of /proc/cpuinfo (or `cpuinfo`), else what platform reports."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def git_commit(folder: Path | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the checkout holding the streamtrain package; ('', None) for an installed copy."""
    folder = folder or Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        # the history a run appends to is its output, not a change to what it measures
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".",
                         ":!benchmarks/history.jsonl", ":!benchmarks/history.png"))
    except (OSError, subprocess.CalledProcessError):
        return "", None
    return commit, dirty


def machine_info(device) -> dict:
    import torch

    commit, dirty = git_commit()
    info = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "commit": commit,
        "dirty": dirty,
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "host": platform.node(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    return info
