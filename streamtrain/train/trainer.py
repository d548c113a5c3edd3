"""The Trainer: builds the model, loaders, precision, optimizer and schedule of a run, then `fit()` loops
over steps: train, count, log, validate, save, stop. Each phase is a method or a collaborator: the step
itself (`step.StepRunner`), the schedule (`schedule.Schedule`), telemetry and signals (`session`), checkpoints
(`checkpoint`), the per-step exchange between ranks (`distributed`).
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from streamtrain.data.batch import Standardizer
from streamtrain.errors import UserError
from streamtrain.model.transformer import CausalTransformer
from streamtrain.telemetry import (
    LiveView,
    device_peak_tflops,
    plot_loss,
    read_metrics,
    summary_text,
)
from streamtrain.telemetry.tensorboard import TENSORBOARD_DIR
from streamtrain.train.checkpoint import (
    capture_rng_state,
    keep_newest,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from streamtrain.train.config import COMPILE_MAX_SHAPES, RunConfig
from streamtrain.train.dataprep import TrainData, make_stream_and_loader
from streamtrain.train.distributed import (
    DistInfo,
    StepControl,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    exchange_step_control,
    rank_seed,
)
from streamtrain.train.ema import WeightEMA
from streamtrain.train.faults import kill_rank_if_asked
from streamtrain.train.feed import isolated, step_groups
from streamtrain.train.loss import loss_terms, masked_sq_error, valid_target_count
from streamtrain.train.optim import build_optimizer
from streamtrain.train.precision import build_precision
from streamtrain.train.probe import probe_run_precision
from streamtrain.train.schedule import HORIZON_PROBE_STEPS, Schedule
from streamtrain.train.session import SIGNAL_EXIT, FitTelemetry, StopSignals
from streamtrain.train.shapes import plan_shape_tokens, plan_shapes, prepare_compile
from streamtrain.train.sharding import (
    full_model_state,
    full_optimizer_state,
    load_full_model_state,
    load_full_optimizer_state,
    local_tensor,
    shard_model,
)
from streamtrain.train.step import StepRunner
from streamtrain.train.validation import validate_on_every_rank

__all__ = [
    "Trainer",
    "DistInfo",
    "TrainingDiverged",
    "masked_sq_error",
    "valid_target_count",
    "plan_shapes",
    "plan_shape_tokens",
    "rank_seed",
    "EXIT_DIVERGED",
]

EXIT_DIVERGED = 3  # the loss became NaN/Inf; last.pt still holds the last good weights


class TrainingDiverged(UserError):
    """The loss became NaN or Inf: the command exits with EXIT_DIVERGED."""

    exit_code = EXIT_DIVERGED


class Trainer:
    """Build with a resolved RunConfig and prepared data; `fit()` runs to the end (or a signal) and returns
    the exit code. The config is read, never changed: values derived from it (warmup, schedule horizon,
    precision) are attributes of the Trainer and saved in the checkpoint."""

    def __init__(self, cfg: RunConfig, data: TrainData, run_dir: Path, device: torch.device,
                 dist_info: DistInfo | None = None, checkpoint: dict | None = None, stream=None):
        self.cfg, self.data, self.device = cfg, data, device
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.dist = dist_info or DistInfo()
        self.stream = stream or sys.stdout
        t = cfg.train

        torch.manual_seed(t.seed)
        np.random.seed(t.seed % 2**32)
        random.seed(t.seed)
        self.standardize = Standardizer(data.index.mean, data.index.std, device)
        self.mean, self.std = self.standardize.mean, self.standardize.std
        self.model = CausalTransformer(cfg.model).to(device)
        self.num_params = self.model.num_params()
        self.sharded = t.fsdp and self.dist.enabled  # --fsdp: FSDP2 instead of DDP (`sharding`)

        max_shapes = cfg.data.max_shapes
        if max_shapes is None and t.compile:
            max_shapes = COMPILE_MAX_SHAPES
        self.train_stream, self.loader = self._make_loader(
            data.train_root, data.train_ids, shuffle=True, rank=self.dist.rank, world_size=self.dist.world_size,
            max_shapes=max_shapes,
        )
        # after the loader, whose plan gives the probe its shapes; before compile and DDP wrap the model
        self.precision = build_precision(
            device, t.amp, t.precision,
            probe=lambda: probe_run_precision(self.model, self.train_stream, self.standardize, device, cfg.model, self.dist),
            recorded=checkpoint.get("precision") if checkpoint is not None else None,
        )
        self.train_model = self._wrap_model(max_shapes)
        # after sharding, which replaces the parameters by their shards
        self.optimizer = build_optimizer(self.model, cfg.optim, device.type)
        self.runner = StepRunner(self.model, self.train_model, self.optimizer, self.precision, self.standardize,
                                 self.dist, device, cfg.optim.clip, t.compile, t.nonfinite == "skip",
                                 sharded=self.sharded)

        # Every rank validates its share of the validation set, see validate().
        self._has_val = data.val_root is not None
        self.val_stream = self.val_loader = None
        if self._has_val:
            self.val_stream, self.val_loader = self._make_loader(
                data.val_root, data.val_ids, shuffle=False, rank=self.dist.rank, world_size=self.dist.world_size)

        self.steps_per_epoch = math.ceil(len(self.loader) / t.grad_accum)
        if self.steps_per_epoch == 0:
            raise UserError(f"{data.train_root}: no batch fits --batch-tokens {cfg.data.batch_tokens}")
        self.max_epochs = t.epochs if t.epochs is not None else (None if t.max_steps is not None else 1)
        limits = [t.max_steps] if t.max_steps is not None else []
        if self.max_epochs is not None:
            limits.append(self.max_epochs * self.steps_per_epoch)
        self.total_steps = min(limits)
        self.schedule = Schedule(cfg.optim, self.total_steps, t.max_seconds)

        self.step = 0
        self.epoch = 0
        self.best_val_loss: float | None = None
        self.skipped_steps = 0  # --nonfinite skip: steps whose update was dropped, over the run
        self._nonfinite_streak = 0
        self._loader_state: dict | None = None
        self._resumed = False
        # Every rank built the same model from --seed; from here on each rank draws its own dropout masks.
        torch.manual_seed(rank_seed(t.seed, self.dist.rank))
        self.ema = WeightEMA(self.model, t.ema) if t.ema is not None else None
        self._evals_since_best = 0  # --patience: validations in a row without a new best
        if checkpoint is not None:
            self._restore(checkpoint)
        self._stop_signal: int | None = None
        self._start_s: float | None = None  # when fit() started: --max-seconds counts from here
        self._fit_start_step = self.step
        self._control: StepControl | None = None  # the last step's exchange
        self._view: LiveView | None = None

    # ------------------------------------------------------------------------------------------------- setup

    def _make_loader(self, root: Path, ids: np.ndarray | None, shuffle: bool, rank: int, world_size: int,
                     max_shapes: int | None = None):
        return make_stream_and_loader(self.cfg, root, ids, shuffle, rank, world_size, self.device, max_shapes)

    def _wrap_model(self, max_shapes: int | None) -> torch.nn.Module:
        """The module the step runs: the model, wrapped in DDP under torchrun, compiled with --compile.
        Compiling the DDP module, as PyTorch recommends, lets Dynamo split the graph at DDP's gradient
        buckets, so each bucket's all-reduce starts while the backward of earlier layers still runs."""
        model: torch.nn.Module = self.model
        self._compile_note: str | None = None
        if self.sharded:
            shard_model(self.model, self.device)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.train.compile:
            self._compile_note = prepare_compile(self.train_stream, max_shapes)
            model = torch.compile(model, dynamic=False)
        return model

    # The schedule's horizon and warmup, as the loop and the checkpoint see them.
    decay_steps = property(lambda self: self.schedule.decay_steps)
    warmup_steps = property(lambda self: self.schedule.warmup_steps)

    # ------------------------------------------------------------------------------------------------- checkpoints

    def _restore(self, ckpt: dict) -> None:
        if self.sharded:
            load_full_model_state(self.model, ckpt["model"])
            load_full_optimizer_state(self.optimizer, ckpt["optimizer"])
        else:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        self.best_val_loss = ckpt.get("best_val_loss")
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self._evals_since_best = int(ckpt.get("evals_since_best", 0))
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self._loader_state = ckpt["loader"]
        self.schedule.load_state_dict(ckpt.get("scheduler", {}))
        self._resumed = True
        by_rank = ckpt.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == self.dist.world_size:
            restore_rng_state(by_rank[self.dist.rank])
        else:
            restore_rng_state(ckpt["rng"])  # rank 0's, saved alone or under another world size
            if self.dist.rank > 0:  # keep this rank's masks its own, as in the run before
                torch.manual_seed(rank_seed(self.cfg.train.seed, self.dist.rank, self.step))

    def _checkpoint(self, model_state: dict | None = None, optimizer_state: dict | None = None) -> dict:
        """The checkpoint dict; `model_state`/`optimizer_state`: the full ones gathered under --fsdp."""
        return {
            "model": model_state if model_state is not None else unwrap_model(self.model).state_dict(),
            "optimizer": optimizer_state if optimizer_state is not None else self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler.is_enabled() else {},
            "precision": self.precision.record(),
            "scheduler": self.schedule.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "loader": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "config": self.cfg.to_json(),
            "stats": {"mean": self.mean.tolist(), "std": self.std.tolist()},
            "best_val_loss": self.best_val_loss,
            "skipped_steps": self.skipped_steps,
            "num_params": self.num_params,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "evals_since_best": self._evals_since_best,
        }

    def _save(self, name: str) -> None:
        # The loss of a step is computed before its update, so check the weights themselves: a checkpoint
        # must never hold NaN/Inf weights.
        norms = torch.stack(torch._foreach_norm([local_tensor(p.detach()) for p in self.model.parameters()])).sum()
        if self.sharded:  # each rank holds a shard: agree on the whole
            norms = all_reduce_sum(self.dist, norms.reshape(1).to(torch.float64))
        self._check_finite(float(norms.sum()), "the weights' norm")
        # every rank's generators, so that each continues its own dropout stream on resume
        rng_by_rank = all_gather_objects(self.dist, capture_rng_state()) if self.dist.enabled else None
        full = (full_model_state(self.model), full_optimizer_state(self.optimizer)) if self.sharded else (None, None)
        if self.dist.is_main:
            checkpoint = self._checkpoint(*full)
            if rng_by_rank is not None:
                checkpoint["rng_by_rank"] = rng_by_rank
            save_checkpoint(self.ckpt_dir / name, checkpoint)
            if name == "last.pt" and self.cfg.train.keep_checkpoints:
                keep_newest(self.ckpt_dir / name, self.step, self.cfg.train.keep_checkpoints)

    # ------------------------------------------------------------------------------------------------- data

    def _iter_isolated(self, loader) -> Iterator:
        return isolated(loader)

    def _step_groups(self) -> Iterator[tuple[int, list, float]]:
        """(epoch, up to --grad-accum micro-batches, seconds spent waiting for them), across epochs, from the
        loader's position (a restored one on the first call after a resume)."""
        state, self._loader_state = self._loader_state, None
        return step_groups(self.loader, self.cfg.train.grad_accum, self.max_epochs, state)

    # ------------------------------------------------------------------------------------------------- step

    def _exchange_control(self, group: list) -> StepControl:
        """The step's global target count and stop flags: one all-reduce under DDP, none alone."""
        terms = loss_terms(self.cfg.model.dim, self.cfg.model.categorical_groups)
        count = sum(valid_target_count(b.lengths, terms) for b in group)
        return exchange_step_control(self.dist, self.device, count, self._stop_signal is not None, self._time_is_up_locally())

    def accumulate_gradients(self, group: list, target_count: int | None = None) -> torch.Tensor:
        """Forward + backward of every micro-batch of `group` (see StepRunner); the target count over all
        ranks is exchanged here when not given."""
        if target_count is None:
            target_count = self._exchange_control(group).target_count
        return self.runner.accumulate_gradients(group, target_count)

    def _train_step(self, group: list) -> tuple[torch.Tensor, torch.Tensor, bool | None]:
        """One optimizer step over `group`: (loss, grad_norm, finite) as StepRunner.run reports them."""
        self._control = self._exchange_control(group)
        out = self.runner.run(group, self._control.target_count, self.schedule.lr(self.step))
        return out.loss, out.grad_norm, out.finite

    # ------------------------------------------------------------------------------------------------- validation

    def validate(self, model: torch.nn.Module | None = None) -> dict:
        """The validation summary of `model` (default: the model trained), on every rank, each evaluating its
        share (see `validation`)."""
        batches = self._iter_isolated(self.val_loader) if self.val_loader is not None else None
        num_batches = self.val_stream.num_global_batches() if self.val_stream is not None else 0
        return validate_on_every_rank(self.model if model is None else model, batches, num_batches, self.dist,
                                      self.cfg.model.dim, self.mean, self.std,
                                      self.data.val_index.mean if self._has_val else None, self.device,
                                      self.precision.autocast, self.sharded and model is None)

    # ------------------------------------------------------------------------------------------------- the loop

    def fit(self) -> int:
        """Train to the step/epoch limit, the time budget or a signal; returns the exit code."""
        t = self.cfg.train
        view = self._live_view()
        if self.step >= self.total_steps:
            view.print(f"nothing to do: step {self.step} already reached --max-steps/--epochs ({self.total_steps})")
        view.print(f"model: {self.num_params / 1e6:.2f}M parameters | device {self.device} | precision "
                   f"{self.precision.name}: {self.precision.reason}")
        if self._compile_note:
            view.print(self._compile_note)
        tel = FitTelemetry(view, self.run_dir / "metrics.jsonl", self.step if self._resumed else None, self.dist,
                           self._peak_flops_per_s(), self.device, saved_step=self.step,
                           tensorboard_dir=self.run_dir / TENSORBOARD_DIR if t.tensorboard else None)
        with tel, StopSignals(self._on_signal):
            self._start_s, self._fit_start_step = tel.start_s, self.step
            for epoch, group, wait_s in self._step_groups() if self.step < self.total_steps else ():
                self.epoch = epoch
                loss, grad_norm, finite = self._train_step(group)
                self.step += 1
                kill_rank_if_asked(self.step, self.dist.rank)
                self._count_nonfinite(finite)
                if self.ema is not None and finite is not False:
                    self.ema.update(self.model)
                tel.count_step(group, wait_s, None if finite is False else loss, self.model.train_flops, self.step)
                self._refit_schedule()
                last_step = self.step >= self.total_steps or self._time_is_up()
                record = self._log_record(tel, grad_norm) if self.step % t.log_every == 0 or last_step else None
                record = self._maybe_validate(tel, record, last_step)
                last_step = last_step or self._out_of_patience(record)
                tel.write(record)
                stop = self._stop_requested()
                if (t.save_every and self.step % t.save_every == 0) or last_step or stop:
                    self._save_last(tel, finite is None and (record is None or "loss" not in record), loss)
                if stop:
                    return self._stopped_by_signal(tel)
                if last_step:
                    break
            else:
                if self.step > tel.saved_step:
                    self._save("last.pt")
        if self.dist.is_main:
            self._summary(tel.last_record, tel.last_val)
        return 0

    def _log_record(self, tel: FitTelemetry, grad_norm: torch.Tensor) -> dict:
        record = tel.record(self.step, self.epoch, self.optimizer.param_groups[0]["lr"], grad_norm)
        if record["loss"] is not None:
            self._check_finite(record["loss"], "training loss")
        if self.cfg.train.nonfinite == "skip":
            record["skipped_steps"] = self.skipped_steps
        return record

    def _refit_schedule(self) -> None:
        if self.schedule.refit_due(self.step - self._fit_start_step, self.step, self.cfg.train.log_every):
            self._set_horizon_from_time(self._start_s, first=self.step - self._fit_start_step == HORIZON_PROBE_STEPS)

    def _set_horizon_from_time(self, start_s: float, first: bool) -> None:
        """Fit the cosine's end to --max-seconds from the mean step time so far (see Schedule), one horizon
        for all ranks: the slowest rank's estimate."""
        elapsed_s = all_reduce_max(self.dist, self.device, time.perf_counter() - start_s)
        line = self.schedule.fit_to_time(self.step, self.step - self._fit_start_step, elapsed_s, first)
        if line:
            self._print(line)

    def _maybe_validate(self, tel: FitTelemetry, record: dict | None, last_step: bool) -> dict | None:
        t = self.cfg.train
        if not self._has_val or not ((t.eval_every and self.step % t.eval_every == 0) or last_step):
            return record
        with tel.excluded():
            val = tel.last_val = self.validate()
        self._check_finite(val["standardized_mse"] or 0.0, "validation loss")
        record = record if record is not None else {"step": self.step, "epoch": self.epoch}
        record["val_loss"], record["val_mse"] = val["standardized_mse"], val["mse"]
        if self.ema is not None:
            with tel.excluded():
                ema_val = self.validate(self.ema.model)
            record["ema_val_loss"], record["ema_val_mse"] = ema_val["standardized_mse"], ema_val["mse"]
        improved = self.best_val_loss is None or val["standardized_mse"] < self.best_val_loss
        self._evals_since_best = 0 if improved else self._evals_since_best + 1
        if improved:
            self.best_val_loss = val["standardized_mse"]
            self._save("best.pt")
        return record

    def _out_of_patience(self, record: dict | None) -> bool:
        """--patience: whether this step validated, and the last `patience` validations in a row found no new
        best (the same decision on every rank, which all see the same validation)."""
        patience = self.cfg.train.patience
        validated = record is not None and "val_loss" in record
        if patience is None or not validated or self._evals_since_best < patience or self.step >= self.total_steps:
            return False
        self._print(f"early stop at step {self.step}: validation has not improved for {patience} evaluations "
                    f"(--patience {patience}; best val_loss {self.best_val_loss:.6g})")
        return True

    def _save_last(self, tel: FitTelemetry, unchecked: bool, loss: torch.Tensor) -> None:
        """Write last.pt (time excluded from throughput); `unchecked`: the step's loss was not checked yet."""
        if unchecked:
            self._check_finite(float(loss), "training loss")
        with tel.excluded():
            self._save("last.pt")
        tel.saved_step = self.step

    def _stopped_by_signal(self, tel: FitTelemetry) -> int:
        tel.close()
        print(f"streamtrain fit: stopped by {signal.Signals(self._stop_signal).name} at step {self.step}; "
              f"saved {self.ckpt_dir / 'last.pt'} (continue with --resume)", file=sys.stderr)
        return SIGNAL_EXIT.get(self._stop_signal, 130)

    # ------------------------------------------------------------------------------------------------- limits

    def _time_is_up_locally(self) -> bool:
        limit_s = self.cfg.train.max_seconds
        return limit_s is not None and self._start_s is not None and time.perf_counter() - self._start_s >= limit_s

    def _time_is_up(self) -> bool:
        """Whether this step is the last for --max-seconds. Alone: this process's clock now. Under DDP: any
        rank's clock when the step started, as exchanged with its target count, so that every rank stops at
        the same step without another collective (acting on the limit one step later)."""
        up = self._control.time_up if self.dist.enabled else self._time_is_up_locally()
        if up and self.step < self.total_steps:
            self._print(f"time limit reached: --max-seconds {self.cfg.train.max_seconds:g} at step {self.step} of {self.total_steps}")
        return up

    def _stop_requested(self) -> bool:
        """A signal arrived: alone, up to now; under DDP, on any rank by the start of this step (exchanged
        with its target count, as for the time limit)."""
        if not self.dist.enabled:
            return self._stop_signal is not None
        if self._control.stop and self._stop_signal is None:
            self._stop_signal = signal.SIGTERM
        return self._control.stop

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise self._diverged(f"{what} became {value} by step {self.step}")

    def _diverged(self, what: str) -> TrainingDiverged:
        last = self.ckpt_dir / "last.pt"
        keep = f"; {last} holds the last good weights" if last.exists() else ""
        return TrainingDiverged(f"{what}{keep}. Lower --lr, raise --warmup-steps, set --clip, or use --precision fp32")

    def _count_nonfinite(self, finite: bool | None) -> None:
        """After each step: a step whose update --nonfinite skip dropped counts; too many in a row stop."""
        if finite is not False:
            self._nonfinite_streak = 0
            return
        self.skipped_steps += 1
        self._nonfinite_streak += 1
        limit = self.cfg.train.nonfinite_limit
        if self._nonfinite_streak >= limit:
            raise self._diverged(
                f"the training loss was NaN/Inf for {limit} consecutive steps (steps {self.step - limit + 1} to "
                f"{self.step}, updates skipped: --nonfinite-limit {limit})"
            )
        self._print(f"step {self.step}: NaN/Inf loss, update skipped ({self.skipped_steps} so far)")

    # ------------------------------------------------------------------------------------------------- output

    def _on_signal(self, signum: int) -> None:
        self._stop_signal = signum
        self._print(f"{signal.Signals(signum).name}: finishing the current step, then saving")

    def _live_view(self) -> LiveView:
        if self._view is None:
            t = self.cfg.train
            self._view = LiveView(self.total_steps, self.step, quiet=t.quiet or not self.dist.is_main,
                                  stream=self.stream, max_seconds=t.max_seconds)
        return self._view

    def _print(self, line: str) -> None:
        if self._view is not None:
            self._view.print(line)

    def _peak_flops_per_s(self) -> float | None:
        """Peak of the whole job (every rank's device), which MFU divides the job's FLOPs by."""
        t = self.cfg.train
        per_device = t.peak_tflops * 1e12 if t.peak_tflops is not None else device_peak_tflops(self.device, self.precision.name) * 1e12
        return per_device * self.dist.world_size if per_device else None

    def _summary(self, last_record: dict | None, last_val: dict | None) -> None:
        path = self.run_dir / "metrics.jsonl"
        records = read_metrics(path) if path.exists() else []
        skipped = self.skipped_steps if self.cfg.train.nonfinite == "skip" else None
        text = summary_text(self.step, last_record, last_val, records, self.run_dir, plot_loss(self.run_dir), skipped)
        print(text, file=self.stream, flush=True)
