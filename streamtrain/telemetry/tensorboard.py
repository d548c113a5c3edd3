"""`fit --tensorboard`: the scalars of every metrics.jsonl record also as TensorBoard events in
RUN/tensorboard/, through torch.utils.tensorboard (which needs the optional tensorboard package)."""

from __future__ import annotations

import math
import os
from typing import Any

from streamtrain.errors import UserError

__all__ = ["TENSORBOARD_DIR", "require_tensorboard", "TensorBoardLog"]

TENSORBOARD_DIR = "tensorboard"  # under the run folder


def require_tensorboard():
    """torch.utils.tensorboard's SummaryWriter, or a UserError saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "--tensorboard needs the tensorboard package (pip install tensorboard); metrics.jsonl holds the same "
            "scalars without it"
        ) from None
    return SummaryWriter


class TensorBoardLog:
    """Writes each record's finite numbers as scalars at its `step`, flushed per record."""

    def __init__(self, log_dir: str | os.PathLike):
        self._writer = require_tensorboard()(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
