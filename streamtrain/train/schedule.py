"""The learning-rate schedule: linear warmup, then cosine decay to a horizon; with --max-seconds (and no
--decay-steps) the horizon is fitted to the time budget from the measured step time, first after
HORIZON_PROBE_STEPS steps and again at every log step, so that the cosine ends when time runs out.
"""

from __future__ import annotations

import math

from streamtrain.train.config import OptimConfig

__all__ = ["HORIZON_PROBE_STEPS", "Schedule", "default_warmup_steps", "lr_at"]

HORIZON_PROBE_STEPS = 20  # steps timed before --max-seconds first sets the schedule's horizon


def default_warmup_steps(decay_steps: int) -> int:
    """The warmup when --warmup-steps is not given: a tenth of the schedule, at most 100 steps."""
    return min(100, decay_steps // 10)


def lr_at(step: int, cfg: OptimConfig, total_steps: int, warmup_steps: int | None = None) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to cfg.lr over `warmup_steps`
    (default cfg.warmup_steps), then cosine decay to cfg.lr * cfg.min_lr_fraction at `total_steps`."""
    warmup = cfg.warmup_steps if warmup_steps is None else warmup_steps
    if warmup is None:
        warmup = default_warmup_steps(total_steps)
    if warmup > 0 and step < warmup:
        return cfg.lr * (step + 1) / warmup
    min_lr = cfg.lr * cfg.min_lr_fraction
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


class Schedule:
    """The rate of every optimizer step, a pure function of (step, decay_steps, warmup_steps); the last two
    are saved in the checkpoint, so a resumed run keeps the horizon its time budget gave it."""

    def __init__(self, cfg: OptimConfig, total_steps: int, max_seconds: float | None):
        self.cfg = cfg
        self.total_steps = total_steps
        self.max_seconds = max_seconds
        self.decay_steps = cfg.decay_steps or total_steps
        self.fits_to_time = max_seconds is not None and cfg.decay_steps is None
        self.estimated = False  # set once the horizon comes from the measured step time
        self._default_warmup = cfg.warmup_steps is None
        self.warmup_steps = default_warmup_steps(self.decay_steps) if self._default_warmup else cfg.warmup_steps

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg, self.decay_steps, self.warmup_steps)

    def refit_due(self, steps_run: int, step: int, log_every: int) -> bool:
        """Whether to fit the horizon now (`steps_run`: steps taken since this process started)."""
        return self.fits_to_time and steps_run >= HORIZON_PROBE_STEPS and (
            steps_run == HORIZON_PROBE_STEPS or step % log_every == 0
        )

    def fit_to_time(self, step: int, steps_timed: int, elapsed_s: float, first: bool) -> str | None:
        """End the cosine near the step the time budget reaches at the mean step time so far (never past
        total_steps); the first fit also shortens a default warmup. Returns the line to print then."""
        per_step_s = elapsed_s / max(steps_timed, 1)
        fits = step + int((self.max_seconds - elapsed_s) / per_step_s)
        self.decay_steps = max(step + 1, min(self.total_steps, fits))
        self.estimated = True
        if not first:
            return None
        if self._default_warmup:
            self.warmup_steps = min(self.warmup_steps, max(step, self.decay_steps // 10))
        return (f"--max-seconds {self.max_seconds:g}: {per_step_s * 1e3:.0f} ms/step, learning-rate schedule set "
                f"to end near step {self.decay_steps} (re-estimated at every log step)")

    def state_dict(self) -> dict:
        return {"kind": "warmup_cosine", "decay_steps": self.decay_steps, "warmup_steps": self.warmup_steps,
                "estimated": self.estimated}

    def load_state_dict(self, state: dict) -> None:
        if state.get("estimated") and self.cfg.decay_steps is None:
            self.decay_steps = int(state["decay_steps"])  # keep the horizon the time limit gave
            self.fits_to_time = False
            self.estimated = True
        if self._default_warmup and state.get("warmup_steps") is not None:
            self.warmup_steps = int(state["warmup_steps"])  # the run's warmup, whatever its new length
