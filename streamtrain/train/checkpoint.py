"""Checkpoints: atomic save and load of everything an exact resume needs."""

from __future__ import annotations

import errno
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamtrain.dataset import atomic_write_with
from streamtrain.errors import UserError

__all__ = [
    "CHECKPOINT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "unwrap_model",
    "remove_temp_files",
    "keep_newest",
]

CHECKPOINT_VERSION = 1


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and torch.compile wrappers, so saved names carry
    neither a `module.` nor an `_orig_mod.` prefix."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def capture_rng_state() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, checkpoint: dict[str, Any]) -> None:
    """torch.save through `format.atomic_write_with` (temp file, fsync, rename, folder fsync): a crash or a
    failing save at any point leaves the previous checkpoint intact and loadable. A full disk is a
    UserError naming the checkpoint.

    A checkpoint is one `torch.save` dict::

        format_version   CHECKPOINT_VERSION
        model            state_dict with the uncompiled, unwrapped parameter names
        optimizer        AdamW state_dict
        scaler           GradScaler state_dict (empty unless fp16)
        precision        amp.Precision.record(): the precision trained in, how it was chosen and, for --amp on a
                         CPU, what the probe measured; a resumed --amp run keeps it instead of probing again
                         (absent before the probe: a resumed run then chooses anew)
        scheduler        {"kind": "warmup_cosine", "decay_steps": N, "warmup_steps": W, "estimated": bool}: the
                         rate is a pure function of step, N and W; "estimated" is True once --max-seconds has
                         fitted N to the measured step time, so a resumed run keeps that horizon
        step, epoch      optimizer steps done; epoch in progress
        loader           the training loader's state_dict (continues exactly where it stopped)
        rng              python, numpy, torch cpu and cuda generator states (of rank 0)
        rng_by_rank      under DDP: the same for every rank, in rank order (each rank has its own dropout stream)
        config           RunConfig.to_json()
        stats            {"mean": [...], "std": [...]} the standardization of inputs and targets (float64 lists)
        best_val_loss    best validation loss (standardized MSE) so far, or None
        skipped_steps    steps whose update --nonfinite skip dropped (absent before that flag: 0)
        ema              with --ema: the moving average of the weights (a state_dict like model)
        evals_since_best validations in a row without a new best (what --patience counts)
        num_params       parameter count of the model

    It holds only tensors and plain Python values, so it loads with `torch.load(weights_only=True)`: loading a
    checkpoint never runs code from the file. It is written to a temp file next to it (`.last.pt.*.tmp`) and
    renamed over it: a crash leaves the previous checkpoint and at most a temp file, which is never loaded and
    which `remove_temp_files` deletes when the next run starts.
    """
    path = Path(path)
    payload = {"format_version": CHECKPOINT_VERSION, **checkpoint}

    def write(f) -> None:
        torch.save(payload, f)
        _fault_point(f)

    try:
        atomic_write_with(path, write)
    except (OSError, RuntimeError) as e:
        full = _disk_full(e)
        if full is None:
            raise
        kept = f"the previous {path.name} is intact" if path.is_file() else "no earlier checkpoint exists"
        raise UserError(
            f"{path}: cannot write the checkpoint: the disk is full ({os.strerror(full.errno)}); {kept}. "
            "Free some space, then continue with --resume"
        ) from None


def _disk_full(e: BaseException | None) -> OSError | None:
    """The ENOSPC/EDQUOT error behind `e`, if any: torch.save reports a failed write as a RuntimeError whose
    context is the OSError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        e = e.__cause__ or e.__context__
    return None


_saves_seen = 0


def _fault_point(f) -> None:
    """Test hooks, as convert has, at the Nth checkpoint save of the process (STREAMTRAIN_TEST_AT_SAVE,
    default 1) once its temp file holds the first half of the checkpoint: STREAMTRAIN_TEST_CRASH_AT=
    checkpoint-write exits the process there, as a power cut would; STREAMTRAIN_TEST_PAUSE_AT=
    checkpoint-write says so on stderr and sleeps there (STREAMTRAIN_TEST_PAUSE_S, default 60 s) so that a
    test can kill it."""
    global _saves_seen
    crash = os.environ.get("STREAMTRAIN_TEST_CRASH_AT") == "checkpoint-write"
    if not crash and os.environ.get("STREAMTRAIN_TEST_PAUSE_AT") != "checkpoint-write":
        return
    _saves_seen += 1
    if _saves_seen != int(os.environ.get("STREAMTRAIN_TEST_AT_SAVE", "1")):
        return
    f.flush()
    f.truncate(f.tell() // 2)
    os.fsync(f.fileno())
    if crash:
        os._exit(86)
    print("paused at checkpoint-write", file=sys.stderr, flush=True)  # the test's cue to kill
    time.sleep(float(os.environ.get("STREAMTRAIN_TEST_PAUSE_S", "60")))


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that checkpoint saves cut short by a crash left in `folder`; return them."""
    folder = Path(folder)
    stale = sorted(folder.glob(".*.pt.*.tmp")) if folder.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def keep_newest(checkpoint: str | os.PathLike, step: int, keep: int) -> list[Path]:
    """Keep a copy of `checkpoint` as step-STEP.pt beside it (a hard link where the filesystem allows, else a
    copy, each renamed into place atomically), then delete all but the newest `keep` such files; return the
    ones deleted."""
    import shutil

    checkpoint = Path(checkpoint)
    folder = checkpoint.parent
    target = folder / f"step-{step:09d}.pt"
    tmp = folder / f".{target.name}.link.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(checkpoint, tmp)
    except OSError:
        shutil.copyfile(checkpoint, tmp)
    os.replace(tmp, target)
    old = sorted(folder.glob("step-*.pt"))[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises a variety of types for a truncated or foreign file
        raise UserError(f"{path}: not a readable streamtrain checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(checkpoint, dict) or "format_version" not in checkpoint:
        raise UserError(f"{path}: not a streamtrain checkpoint")
    if checkpoint["format_version"] > CHECKPOINT_VERSION:
        raise UserError(
            f"{path}: checkpoint format {checkpoint['format_version']} is newer than this streamtrain reads "
            f"({CHECKPOINT_VERSION}); upgrade streamtrain"
        )
    return checkpoint
