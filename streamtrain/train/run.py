"""The entry point of `streamtrain fit`: parse config -> prepare data -> build -> train -> close.

Owns what happens around the Trainer: merging defaults, a resumed run's config, the --config file and the
flags; the run folder (a new run never overwrites an old one, --resume continues it); the checks that a
resumed run still matches its checkpoint; joining and leaving the process group, and turning a failed
collective into one line naming the lost rank.

Under torchrun a restarted job (TORCHELASTIC_RESTART_COUNT > 0, `torchrun --max-restarts K`) resumes from
the run folder's checkpoints/last.pt as `--resume` would, or starts anew when the first attempt died before
its first save.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch

from streamtrain.errors import UserError
from streamtrain.train.checkpoint import load_checkpoint, remove_temp_files
from streamtrain.train.config import (
    COMPILE_MAX_SHAPES,
    ModelConfig,
    RunConfig,
    read_config_file,
    resolve_config,
    write_config,
)
from streamtrain.train.dataprep import prepare_data
from streamtrain.train.distributed import (
    announce_main_ready,
    close_distributed,
    rank_lost_error,
    setup_distributed,
    wait_for_main,
)
from streamtrain.train.trainer import Trainer

__all__ = ["run_fit"]


def run_fit(flags: dict[str, Any], config_file: str | None = None, resume: bool = False, stream=None) -> int:
    """Run `streamtrain fit` with `flags` (config field -> value, as given on the command line). Returns the
    exit code."""
    file_values = read_config_file(config_file) if config_file else {}
    out = flags.get("out", file_values.get("out"))
    if out is None:
        raise UserError("--out RUN is required (the run folder)")
    run_dir = Path(out)
    last = run_dir / "checkpoints" / "last.pt"
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restart > 0 and not resume and last.is_file():
        resume = True
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"torchrun restart {restart}: resuming from {last}", file=stream or sys.stdout, flush=True)
    checkpoint = None
    if resume:
        if not last.is_file():
            raise UserError(f"--resume: {last} does not exist (nothing to resume; drop --resume to start a new run)")
        checkpoint = load_checkpoint(last)
    elif last.exists():
        raise UserError(f"{run_dir} already holds a run ({last}); pass --resume to continue it or choose another --out")
    cfg = resolve_config(flags, file_values, base=checkpoint["config"] if checkpoint else None)
    cfg.check_complete()
    if cfg.train.tensorboard:
        from streamtrain.telemetry.tensorboard import require_tensorboard

        require_tensorboard()  # before any work: the one line saying what to install
    cfg = _with_max_shapes(cfg, resumed=checkpoint is not None)

    dist_info, device = setup_distributed(cfg.train.device, cfg.train.dist_timeout)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    done = False
    trainer = None
    try:
        data = _prepare(cfg, run_dir, dist_info)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=data.index.dim))
        cfg.model.check_groups()
        if checkpoint is not None:
            _check_same_model(cfg.model, ModelConfig(**checkpoint["config"]["model"]))
        trainer = Trainer(cfg, data, run_dir, device, dist_info, checkpoint, stream=stream)
        if dist_info.is_main:  # once the Trainer has chosen the precision (--amp may measure it)
            write_config(run_dir / "config.json", cfg, derived={"precision": trainer.precision.record()})
        code = trainer.fit()
        done = True
        return code
    except UserError:
        raise
    except Exception:
        during = f"at step {trainer.step}" if trainer is not None else "before training"
        lost = rank_lost_error(dist_info, during)
        if lost is None:
            raise
        raise lost from None
    finally:
        close_distributed(dist_info, done)


def _prepare(cfg: RunConfig, run_dir: Path, dist_info):
    """The run's data: rank 0 writes (the run folder, synthetic data, a conversion) while the others wait."""
    if not dist_info.is_main:
        wait_for_main(dist_info, "data", "preparing the data")
        return prepare_data(cfg, run_dir, is_main=False)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_temp_files(run_dir / "checkpoints")  # what a crash during a save left
        data = prepare_data(cfg, run_dir, is_main=True)
    except BaseException:
        announce_main_ready(dist_info, "data", ok=False)
        raise
    announce_main_ready(dist_info, "data", ok=True)
    return data


def _with_max_shapes(cfg: RunConfig, resumed: bool) -> RunConfig:
    """Fix the default --max-shapes in the run's config, so that resuming with or without --compile keeps the
    batch plan (and with it the loader position) of the run. A resumed run whose config has none predates
    the flag and used the loader's default."""
    if cfg.data.max_shapes is not None:
        return cfg
    from streamtrain.data.bucketing import DEFAULT_MAX_SHAPES

    max_shapes = COMPILE_MAX_SHAPES if cfg.train.compile and not resumed else DEFAULT_MAX_SHAPES
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_shapes=max_shapes))


def _check_same_model(model: ModelConfig, saved: ModelConfig) -> None:
    if saved != model:
        diffs = [
            f"--{f.name.replace('_', '-')} {getattr(model, f.name)} (checkpoint: {getattr(saved, f.name)})"
            for f in dataclasses.fields(ModelConfig)
            if getattr(saved, f.name) != getattr(model, f.name)
        ]
        raise UserError(f"--resume: model config differs from the checkpoint's: {', '.join(diffs)}")
