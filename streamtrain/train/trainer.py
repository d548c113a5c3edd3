"""The Trainer: the masked next-step loss, gradient accumulation, mixed precision, AdamW + warmup/cosine,
clipping, validation, checkpoints with exact resume, signals, the --max-seconds budget, DDP and telemetry.

Loss of one optimizer step over K micro-batches (and every rank under DDP):

    loss = sum over micro-batches, sequences b, positions t with t + 1 < length_b, dims d of
               (model(x_std)[b, t, d] - x_std[b, t + 1, d])^2
           / (number of such (t, d) entries in the whole step)

i.e. one mean over the step's valid targets, not a mean of per-batch means: a micro-batch of short sequences
weighs exactly its share of targets. The count is known before any backward because the K micro-batches are
fetched first.

Process-group set-up and the per-step control exchange live in `distributed`, the entry point of
`streamtrain fit` (config, run folder, resume) in `fitrun`, record and summary formatting in `metrics`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamtrain.data import bucketing
from streamtrain.data.batch import Standardizer, model_offsets
from streamtrain.errors import UserError
from streamtrain.eval.evaluate import (
    EvalSums,
    accumulate_eval,
    eval_summary,
)
from streamtrain.model.transformer import CausalTransformer
from streamtrain.telemetry import (
    LiveView,
    MetricsLog,
    ThroughputMeter,
    device_peak_tflops,
    peak_memory_mb,
    plot_loss,
    read_metrics,
    summary_text,
    training_record,
)
from streamtrain.train.checkpoint import (
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
    unwrap_model,
)
from streamtrain.train.config import COMPILE_MAX_SHAPES, RunConfig
from streamtrain.train.dataprep import TrainData
from streamtrain.train.distributed import (
    DistInfo,
    StepControl,
    all_gather_objects,
    all_reduce_max,
    all_reduce_sum,
    broadcast_from_main,
    exchange_step_control,
)
from streamtrain.train.optim import build_optimizer, default_warmup_steps, lr_at, set_lr
from streamtrain.train.precision import (
    CpuProbe,
    ProbeShape,
    autocast_for,
    build_precision,
    probe_cpu_precision,
)

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
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}
_HORIZON_PROBE_STEPS = 20  # steps timed before --max-seconds first sets the schedule's horizon


class TrainingDiverged(UserError):
    """The loss became NaN or Inf: the command exits with EXIT_DIVERGED."""

    exit_code = EXIT_DIVERGED


def masked_sq_error(pred: torch.Tensor, x_std: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of squared next-step errors over valid targets, in fp32.

    pred, x_std: (B, T, D); mask: (B, T) True on real vectors. Position t predicts x_std[t+1] and counts
    when t+1 is real (right padding: then t is real too)."""
    diff = pred[:, :-1].float() - x_std[:, 1:].float()  # (B, T-1, D)
    return diff.square().masked_fill(~mask[:, 1:, None], 0.0).sum()


def valid_target_count(lengths: torch.Tensor, dim: int) -> int:
    """Number of (position, dim) loss terms of a micro-batch: sum over sequences of (length - 1) * dim."""
    return int((lengths - 1).clamp(min=0).sum()) * dim


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """Seed of rank `rank`'s per-sample randomness (dropout): a pure function of (--seed, rank, ...), distinct
    for every rank and from the stream --seed itself starts (which initialised the model)."""
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1, np.uint64)[0])


def plan_shapes(stream, epoch: int = 0) -> set[tuple[int, int]]:
    """The distinct (B, T) batch shapes of `epoch`'s plan of a ShardStream (all ranks together)."""
    plan = stream.plan(epoch)
    sizes = np.diff(plan.starts)
    return set(zip(sizes.tolist(), np.asarray(plan.padded_len).tolist()))


def plan_shape_tokens(stream, epoch: int = 0) -> dict[tuple[int, int], int]:
    """Padded tokens per (B, T) batch shape over `epoch`'s plan of a ShardStream (all ranks together)."""
    plan = stream.plan(epoch)
    sizes = np.diff(plan.starts)[plan.batch_order]  # the epoch's batches
    lengths = np.asarray(plan.padded_len)[plan.batch_order]
    tokens: dict[tuple[int, int], int] = {}
    for B, T in zip(sizes.tolist(), lengths.tolist()):
        tokens[(B, T)] = tokens.get((B, T), 0) + B * T
    return tokens


class Trainer:
    """Build with a resolved RunConfig and prepared data; `fit()` runs to the end (or a signal) and returns
    the exit code. The config is read, never changed: values derived from it (warmup, schedule horizon)
    are attributes of the Trainer and saved in the checkpoint."""

    def __init__(
        self,
        cfg: RunConfig,
        data: TrainData,
        run_dir: Path,
        device: torch.device,
        dist_info: DistInfo | None = None,
        checkpoint: dict | None = None,
        stream=None,
    ):
        self.cfg = cfg
        self.data = data
        self.run_dir = Path(run_dir)
        self.device = device
        self.dist = dist_info or DistInfo()
        self.stream = stream or sys.stdout
        self.ckpt_dir = self.run_dir / "checkpoints"
        t = cfg.train

        torch.manual_seed(t.seed)
        np.random.seed(t.seed % 2**32)
        random.seed(t.seed)

        self.standardize = Standardizer(data.index.mean, data.index.std, device)
        self.mean, self.std = self.standardize.mean, self.standardize.std

        self.model = CausalTransformer(cfg.model).to(device)
        self.num_params = self.model.num_params()
        self.optimizer = build_optimizer(self.model, cfg.optim, device.type)

        max_shapes = cfg.data.max_shapes
        if max_shapes is None and t.compile:
            max_shapes = COMPILE_MAX_SHAPES
        self.train_stream, self.loader = self._make_loader(
            data.train_root, data.train_ids, shuffle=True, rank=self.dist.rank, world_size=self.dist.world_size,
            max_shapes=max_shapes,
        )
        # after the loader, whose plan gives the probe its shapes; before compile and DDP wrap the model
        self.precision = build_precision(
            device, t.amp, t.precision, probe=self._probe_cpu_precision,
            recorded=checkpoint.get("precision") if checkpoint is not None else None,
        )
        self.train_model: torch.nn.Module = self.model
        self._compile_note: str | None = None
        if t.compile:
            self._compile_note = self._prepare_compile(max_shapes)
            self.train_model = torch.compile(self.model, dynamic=False)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[device.index] if device.type == "cuda" else None
            )

        # Validation runs on rank 0 alone over the whole set (every sequence exactly once), see validate().
        self._has_val = data.val_root is not None
        self.val_loader = None
        if self._has_val:
            if self.dist.is_main:
                _, self.val_loader = self._make_loader(data.val_root, data.val_ids, shuffle=False, rank=0, world_size=1)
            self._val_index_mean = data.val_index.mean

        self.steps_per_epoch = math.ceil(len(self.loader) / t.grad_accum)
        if self.steps_per_epoch == 0:
            raise UserError(f"{data.train_root}: no batch fits --batch-tokens {cfg.data.batch_tokens}")
        self.max_epochs = t.epochs if t.epochs is not None else (None if t.max_steps is not None else 1)
        limits = [t.max_steps] if t.max_steps is not None else []
        if self.max_epochs is not None:
            limits.append(self.max_epochs * self.steps_per_epoch)
        self.total_steps = min(limits)
        self.decay_steps = cfg.optim.decay_steps or self.total_steps
        # With --max-seconds and no --decay-steps the horizon is re-estimated from the measured step time
        # after _HORIZON_PROBE_STEPS steps and at every log step, so that the cosine ends when time runs out.
        self._estimate_horizon = t.max_seconds is not None and cfg.optim.decay_steps is None
        self._horizon_estimated = False  # set once the horizon comes from the measured step time
        self._default_warmup = cfg.optim.warmup_steps is None
        self.warmup_steps = default_warmup_steps(self.decay_steps) if self._default_warmup else cfg.optim.warmup_steps

        self.step = 0
        self.epoch = 0
        self.best_val_loss: float | None = None
        # --nonfinite skip: steps whose update was dropped (over the run) and the current run of them
        self._skip_nonfinite = t.nonfinite == "skip"
        self.skipped_steps = 0
        self._nonfinite_streak = 0
        self._loader_state: dict | None = None
        self._resumed = False
        # Every rank built the same model from --seed; from here on each rank draws its own dropout masks.
        torch.manual_seed(rank_seed(t.seed, self.dist.rank))
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
        from streamtrain.data import ShardStream, make_loader

        d = self.cfg.data
        kwargs: dict[str, Any] = {
            "max_tokens": d.batch_tokens, "seed": self.cfg.train.seed, "shuffle": shuffle, "rank": rank,
            "world_size": world_size, "verify": d.verify,
        }
        if d.batch is not None:
            kwargs["max_sequences"] = d.batch
        if d.max_len is not None:
            longest = bucketing.longest_row(d.batch_tokens, bucketing.DEFAULT_PAD_MULTIPLE)
            if d.max_len > longest:
                raise UserError(
                    f"--max-len {d.max_len} does not fit a micro-batch: --batch-tokens {d.batch_tokens} holds rows "
                    f"of at most {longest} vectors (a multiple of {bucketing.DEFAULT_PAD_MULTIPLE}); lower --max-len "
                    "or raise --batch-tokens"
                )
            kwargs["max_len"] = d.max_len
        if ids is not None:
            kwargs["ids"] = ids
        if max_shapes is not None:
            kwargs["max_shapes"] = max_shapes
        stream = ShardStream(str(root), **kwargs)
        num_workers = d.num_workers if d.num_workers is not None else (0 if self.device.type == "cpu" else 2)
        loader = make_loader(stream, num_workers=num_workers, pin_memory=self.device.type == "cuda")
        return stream, loader

    def _prepare_compile(self, max_shapes: int) -> str:
        """Let torch.compile keep a graph for every padded length of the training plan; return the line
        that says so and what the fewer shapes cost in padding.

        The batch dimension is marked dynamic on every call, so only T selects a graph: one per T, plus one
        per T whose batches include B == 1 (torch specializes size-1 dimensions)."""
        import torch._dynamo

        stream = self.train_stream
        shapes = plan_shapes(stream)
        lengths = {T for _, T in shapes}
        needed = 2 * len(lengths) + 8
        config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
            if hasattr(config, name):  # torch renamed cache_size_limit to recompile_limit in 2.6
                setattr(config, name, max(getattr(config, name), needed))
        # the padding the loader's default shape count would leave, for comparison
        items = stream.items.lengths
        default_bounds = bucketing.bucket_bounds(items, stream.pad_multiple, bucketing.DEFAULT_MAX_SHAPES)
        default_plan = bucketing.plan_epoch(items, default_bounds, stream.max_tokens, 0, 0, shuffle=False)
        return (
            f"--compile: {len(shapes)} batch shapes (B, T) per epoch over {len(lengths)} padded lengths T "
            f"(--max-shapes {max_shapes}); B is dynamic, so about one compilation per T. Padding: "
            f"{100 * bucketing.pad_fraction(items, stream.plan(0)):.1f}% of batch tokens "
            f"({100 * bucketing.pad_fraction(items, default_plan):.1f}% with {len(default_bounds)} lengths uncompiled)"
        )

    def _probe_cpu_precision(self) -> CpuProbe:
        """--amp on a CPU: rank 0 times this model's forward + backward in fp32 and bf16 at the training
        plan's most frequent shapes (amp.probe_cpu_precision; cached per machine and config) and every rank
        takes its answer. The probe runs the training step's code on a copy of the model and on batches of
        the plan read apart from the loader, and puts every global generator back as it found it, so the run
        is the one `--precision` with the same answer gives."""
        probe = None
        if self.dist.is_main:
            rng = capture_rng_state()
            try:
                probe = probe_cpu_precision(
                    self._probe_step(), plan_shape_tokens(self.train_stream), dataclasses.asdict(self.cfg.model)
                )
            finally:
                restore_rng_state(rng)
        if self.dist.enabled:
            probe = all_gather_objects(self.dist, probe)[0]
        return probe

    def _probe_step(self) -> Callable[[str, ProbeShape], None]:
        """The training step's forward, masked loss and backward (`_micro_batch_loss`) on a real batch of
        the plan with the (B, T) shape asked for, in a precision, on a copy of the model: the real model's
        weights and gradients, the optimizer and the loader's position are never touched."""
        model = copy.deepcopy(self.model).train()
        stream = self.train_stream
        plan = stream.plan(0)
        sizes, lengths = np.diff(plan.starts), np.asarray(plan.padded_len)
        batches: dict[tuple[int, int], Any] = {}

        def run(precision: str, shape: ProbeShape) -> None:
            B, T = shape.batch, shape.length
            if (B, T) not in batches:
                s = int(np.flatnonzero((sizes == B) & (lengths == T))[0])  # a segment of that shape
                batches[(B, T)] = stream.make_batch(plan.order[plan.starts[s] : plan.starts[s + 1]], T)
            batch = batches[(B, T)]
            scale = 1.0 / max(valid_target_count(batch.lengths, self.cfg.model.dim), 1)
            loss = self._micro_batch_loss(model, batch, scale, lambda: autocast_for(precision, self.device.type), False)
            loss.backward()
            model.zero_grad(set_to_none=True)

        return run

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.best_val_loss = ckpt.get("best_val_loss")
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))
        self._loader_state = ckpt["loader"]
        scheduler = ckpt.get("scheduler", {})
        if scheduler.get("estimated") and self.cfg.optim.decay_steps is None:
            self.decay_steps = int(scheduler["decay_steps"])  # keep the horizon the time limit gave
            self._estimate_horizon = False
            self._horizon_estimated = True
        if self._default_warmup and scheduler.get("warmup_steps") is not None:
            self.warmup_steps = int(scheduler["warmup_steps"])  # the run's warmup, whatever its new length
        self._resumed = True
        by_rank = ckpt.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == self.dist.world_size:
            restore_rng_state(by_rank[self.dist.rank])
        else:
            restore_rng_state(ckpt["rng"])  # rank 0's, saved alone or under another world size
            if self.dist.rank > 0:  # keep this rank's masks its own, as in the run before
                torch.manual_seed(rank_seed(self.cfg.train.seed, self.dist.rank, self.step))

    def _checkpoint(self) -> dict:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler.is_enabled() else {},
            "precision": self.precision.record(),
            "scheduler": {
                "kind": "warmup_cosine",
                "decay_steps": self.decay_steps,
                "warmup_steps": self.warmup_steps,
                "estimated": self._horizon_estimated,
            },
            "step": self.step,
            "epoch": self.epoch,
            "loader": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "config": self.cfg.to_json(),
            "stats": {"mean": self.mean.tolist(), "std": self.std.tolist()},
            "best_val_loss": self.best_val_loss,
            "skipped_steps": self.skipped_steps,
            "num_params": self.num_params,
        }

    def _save(self, name: str) -> None:
        # The loss of a step is computed before its update, so check the weights themselves: a checkpoint
        # must never hold NaN/Inf weights.
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        self._check_finite(float(torch.stack(norms).sum()), "the weights' norm")
        # every rank's generators, so that each continues its own dropout stream on resume
        rng_by_rank = all_gather_objects(self.dist, capture_rng_state()) if self.dist.enabled else None
        if self.dist.is_main:
            checkpoint = self._checkpoint()
            if rng_by_rank is not None:
                checkpoint["rng_by_rank"] = rng_by_rank
            save_checkpoint(self.ckpt_dir / name, checkpoint)

    # ------------------------------------------------------------------------------------------------- data

    @staticmethod
    def _next(it: Iterator):
        # A DataLoader draws its worker seed from the global torch RNG when its iterator starts (inside the
        # first next()); keep that draw out of the training RNG stream, so that a resumed run consumes
        # exactly the random numbers (dropout) of an uninterrupted one.
        state = torch.get_rng_state()
        try:
            return next(it)
        finally:
            torch.set_rng_state(state)

    def _iter_isolated(self, loader) -> Iterator:
        it = iter(loader)
        while True:
            try:
                yield self._next(it)
            except StopIteration:
                return

    def _step_groups(self) -> Iterator[tuple[int, list, float]]:
        """Yield (epoch, up to K micro-batches, seconds spent waiting for them), across epochs.

        The loader keeps its own position (epoch, batches done): one pass over it is the rest of the current
        epoch, after which it points at the next epoch's first batch; a restored state continues mid-epoch."""
        K = self.cfg.train.grad_accum
        if self._loader_state is not None:
            self.loader.load_state_dict(self._loader_state)
            self._loader_state = None
        while True:
            epoch = self.loader.epoch
            if self.max_epochs is not None and epoch >= self.max_epochs:
                return
            it = self._iter_isolated(self.loader)
            while True:
                t0 = time.perf_counter()
                group = list(itertools.islice(it, K))
                wait_s = time.perf_counter() - t0
                if group:
                    yield epoch, group, wait_s
                if len(group) < K:
                    break

    # ------------------------------------------------------------------------------------------------- step

    def _exchange_control(self, group: list) -> StepControl:
        """The step's global target count and stop flags: one all-reduce under DDP, none alone."""
        count = sum(valid_target_count(b.lengths, self.cfg.model.dim) for b in group)
        return exchange_step_control(self.dist, self.device, count, self._stop_signal is not None, self._time_is_up_locally())

    def _train_step(self, group: list) -> tuple[torch.Tensor, torch.Tensor, bool | None]:
        """One optimizer step over the micro-batches of `group`; returns (loss, grad_norm, finite): loss and
        grad_norm as tensors (no host sync here beyond the control exchange under DDP). `finite` is None
        unless --nonfinite skip, where a step with a NaN/Inf loss (or gradient norm, unless a GradScaler
        handles overflowing gradients itself) drops its update and returns False."""
        self._control = self._exchange_control(group)
        loss = self.accumulate_gradients(group, self._control.target_count)
        scaler = self.precision.scaler
        scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip if self.cfg.optim.clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        finite = None
        if self._skip_nonfinite:
            finite = self._step_is_finite(loss, grad_norm, scaler.is_enabled())
            if not finite:
                scaler.update()  # after unscale_ it saw the NaN/Inf gradients: an fp16 scale backs off
                self.optimizer.zero_grad(set_to_none=True)
                return loss, grad_norm, False
        set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, self.decay_steps, self.warmup_steps))
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, finite

    def _step_is_finite(self, loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool) -> bool:
        """Whether the step's loss (summed over ranks, so that every rank decides alike) and, without a
        GradScaler, its gradient norm (the same on every rank after DDP's all-reduce) are finite. One host
        sync per step, and under DDP one all-reduce: the price of --nonfinite skip."""
        step_loss = all_reduce_sum(self.dist, loss.reshape(1).to(torch.float64))
        checks = step_loss if scaled else torch.cat([step_loss, grad_norm.reshape(1).to(torch.float64)])
        return bool(torch.isfinite(checks).all())

    def accumulate_gradients(self, group: list, target_count: int | None = None) -> torch.Tensor:
        """Forward + backward of every micro-batch of `group`, normalized by the step's count of valid
        targets over all ranks (`target_count`; default: exchanged here). Returns this rank's share of the
        step loss (detached): the shares of all ranks sum to the step loss."""
        if target_count is None:
            target_count = self._exchange_control(group).target_count
        # DDP averages gradients over ranks; multiplying by world_size turns that average into the global sum.
        scale = self.dist.world_size / max(target_count, 1)
        compiled = self.cfg.train.compile
        loss_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(group):
            sync_ctx = (
                self.train_model.no_sync() if self.dist.enabled and i < len(group) - 1 else contextlib.nullcontext()
            )
            with sync_ctx:
                loss = self._micro_batch_loss(self.train_model, batch, scale, self.precision.autocast, compiled)
                self.precision.scaler.scale(loss).backward()
            loss_total += loss.detach()
        return loss_total / self.dist.world_size

    def _micro_batch_loss(self, model, batch, scale: float, autocast, compiled: bool) -> torch.Tensor:
        """Forward of one micro-batch under `autocast()` and its masked loss times `scale`, in fp32."""
        x = batch.x.to(self.device, non_blocking=True)
        mask = batch.mask.to(self.device, non_blocking=True)
        x_std = self.standardize(x, mask)
        # compiled: always pass offsets, one graph per T instead of two
        offsets = model_offsets(batch, self.device, always=compiled)
        if compiled:
            torch._dynamo.maybe_mark_dynamic(x_std, 0)  # B: only T selects a graph
            torch._dynamo.maybe_mark_dynamic(offsets, 0)
        with autocast():
            pred = model(x_std, offsets)
        return masked_sq_error(pred, x_std, mask) * scale

    # ------------------------------------------------------------------------------------------------- validation

    def validate(self) -> dict:
        """The validation summary, on every rank. Rank 0 evaluates the plain model (no DDP, no compile) over
        the whole validation set, every sequence exactly once; the other ranks wait for its sums, so all
        ranks stay in lockstep and take the same best-checkpoint decision."""
        assert self._has_val
        sums = EvalSums(self.cfg.model.dim, self.device)
        if self.val_loader is not None:
            accumulate_eval(
                self.model, self._iter_isolated(self.val_loader), sums, self.mean, self.std,
                self._val_index_mean, self.device, self.precision.autocast,
            )
        if self.dist.enabled:
            sums.load_tensor(broadcast_from_main(self.dist, sums.as_tensor()))
        return eval_summary(sums)

    # ------------------------------------------------------------------------------------------------- loop

    def _peak_flops_per_s(self) -> float | None:
        """Peak of the whole job (every rank's device), which MFU divides the job's FLOPs by."""
        t = self.cfg.train
        if t.peak_tflops is not None:
            per_device = t.peak_tflops * 1e12
        else:
            per_device = device_peak_tflops(self.device, self.precision.name) * 1e12
        return per_device * self.dist.world_size if per_device else None

    def _install_signals(self):
        if not _in_main_thread():  # signal handlers can only be installed from the main thread
            return {}
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            self._print(f"{signal.Signals(signum).name}: finishing the current step, then saving")

        for sig in _SIGNAL_EXIT:
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _print(self, line: str) -> None:
        if self._view is not None:
            self._view.print(line)

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise self._diverged(f"{what} became {value} by step {self.step}")

    def _diverged(self, what: str) -> TrainingDiverged:
        last = self.ckpt_dir / "last.pt"
        keep = f"; {last} holds the last good weights" if last.exists() else ""
        return TrainingDiverged(
            f"{what}{keep}. Lower --lr, raise --warmup-steps, set --clip, or use --precision fp32"
        )

    def _count_nonfinite(self) -> None:
        """A step whose update --nonfinite skip dropped; too many in a row stop the run."""
        self.skipped_steps += 1
        self._nonfinite_streak += 1
        limit = self.cfg.train.nonfinite_limit
        if self._nonfinite_streak >= limit:
            raise self._diverged(
                f"the training loss was NaN/Inf for {limit} consecutive steps (steps {self.step - limit + 1} to "
                f"{self.step}, updates skipped: --nonfinite-limit {limit})"
            )
        self._print(f"step {self.step}: NaN/Inf loss, update skipped ({self.skipped_steps} so far)")

    def fit(self) -> int:
        t = self.cfg.train
        is_main = self.dist.is_main
        self._view = view = LiveView(
            self.total_steps, self.step, quiet=t.quiet or not is_main, stream=self.stream, max_seconds=t.max_seconds
        )
        view.print(
            f"model: {self.num_params / 1e6:.2f}M parameters | device {self.device} | precision {self.precision.name}: "
            f"{self.precision.reason}"
        )
        if self._compile_note:
            view.print(self._compile_note)
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if self._resumed else None, enabled=is_main)
        meter = ThroughputMeter(self._peak_flops_per_s())
        previous_handlers = self._install_signals()
        self._start_s = start_s = time.perf_counter()
        self._fit_start_step = self.step
        loss_acc = torch.zeros((), device=self.device)
        steps_acc = 0
        last_record: dict | None = None
        last_val: dict | None = None
        saved_step = self.step
        exit_code = 0
        try:
            if self.step >= self.total_steps:
                view.print(f"nothing to do: step {self.step} already reached --max-steps/--epochs ({self.total_steps})")
            for epoch, group, wait_s in self._step_groups() if self.step < self.total_steps else ():
                self.epoch = epoch
                loss, grad_norm, finite = self._train_step(group)
                self.step += 1
                lengths = torch.cat([b.lengths for b in group])
                padded = sum(b.mask.numel() for b in group)
                meter.add(int(lengths.sum()), padded, wait_s, self.model.train_flops(lengths))
                if finite is False:
                    self._count_nonfinite()
                else:
                    self._nonfinite_streak = 0
                    loss_acc += loss
                    steps_acc += 1
                view.advance(self.step, time.perf_counter() - start_s)
                steps_run = self.step - self._fit_start_step
                if self._estimate_horizon and steps_run >= _HORIZON_PROBE_STEPS and (
                    steps_run == _HORIZON_PROBE_STEPS or self.step % t.log_every == 0
                ):
                    self._set_horizon_from_time(start_s, first=steps_run == _HORIZON_PROBE_STEPS)
                last_step = self.step >= self.total_steps or self._time_is_up()
                record = None
                if self.step % t.log_every == 0 or last_step:
                    record = self._log_record(loss_acc, steps_acc, grad_norm, meter, start_s)
                    loss_acc.zero_()
                    steps_acc = 0
                if self._has_val and ((t.eval_every and self.step % t.eval_every == 0) or last_step):
                    val_start_s = time.perf_counter()
                    last_val = self.validate()
                    meter.exclude(time.perf_counter() - val_start_s)
                    self._check_finite(last_val["standardized_mse"] or 0.0, "validation loss")
                    if record is None:
                        record = {"step": self.step, "epoch": self.epoch}
                    record["val_loss"] = last_val["standardized_mse"]
                    record["val_mse"] = last_val["mse"]
                    if self.best_val_loss is None or last_val["standardized_mse"] < self.best_val_loss:
                        self.best_val_loss = last_val["standardized_mse"]
                        self._save("best.pt")
                if record is not None:
                    metrics.write(record)
                    if "loss" in record:
                        view.log(record)
                        last_record = record
                stop = self._stop_requested()
                if (t.save_every and self.step % t.save_every == 0) or last_step or stop:
                    if finite is None and (record is None or "loss" not in record):
                        self._check_finite(float(loss), "training loss")
                    save_start_s = time.perf_counter()
                    self._save("last.pt")
                    meter.exclude(time.perf_counter() - save_start_s)
                    saved_step = self.step
                if stop:
                    view.close()
                    print(
                        f"streamtrain fit: stopped by {signal.Signals(self._stop_signal).name} at step {self.step}; "
                        f"saved {self.ckpt_dir / 'last.pt'} (continue with --resume)",
                        file=sys.stderr,
                    )
                    exit_code = _SIGNAL_EXIT.get(self._stop_signal, 130)
                    break
                if last_step:
                    break
            else:
                if self.step > saved_step:
                    self._save("last.pt")
        finally:
            view.close()
            metrics.close()
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
        if is_main and exit_code == 0:
            self._summary(last_record, last_val)
        return exit_code

    def _set_horizon_from_time(self, start_s: float, first: bool) -> None:
        """Fit the cosine's end to --max-seconds from the mean step time so far. First after
        _HORIZON_PROBE_STEPS steps, then again at every log step, so that a slow start (allocator warm-up,
        a busy machine) does not end the schedule early; the estimate moves little once it has settled."""
        # one horizon for all ranks: the slowest rank's estimate
        elapsed_s = all_reduce_max(self.dist, self.device, time.perf_counter() - start_s)
        steps_timed = self.step - self._fit_start_step
        per_step_s = elapsed_s / max(steps_timed, 1)
        fits = self.step + int((self.cfg.train.max_seconds - elapsed_s) / per_step_s)
        self.decay_steps = max(self.step + 1, min(self.total_steps, fits))
        self._horizon_estimated = True
        if not first:
            return
        if self._default_warmup:
            self.warmup_steps = min(self.warmup_steps, max(self.step, self.decay_steps // 10))
        self._print(
            f"--max-seconds {self.cfg.train.max_seconds:g}: {per_step_s * 1e3:.0f} ms/step, "
            f"learning-rate schedule set to end near step {self.decay_steps} (re-estimated at every log step)"
        )

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

    def _log_record(self, loss_acc, steps_acc, grad_norm, meter, start_s) -> dict:
        # One all-reduce for the job's loss (every rank's share of each step) and its token and FLOP counts.
        packed = torch.cat([
            loss_acc.reshape(1).to(torch.float64),
            torch.tensor([meter.real_tokens, meter.padded_tokens, meter.flops], dtype=torch.float64, device=self.device),
        ])
        loss_sum, real_tokens, padded_tokens, flops = all_reduce_sum(self.dist, packed).tolist()
        loss = loss_sum / steps_acc if steps_acc else None  # None: --nonfinite skip dropped every step since the last log
        if loss is not None:
            self._check_finite(loss, "training loss")
        meter.real_tokens, meter.padded_tokens, meter.flops = int(real_tokens), int(padded_tokens), flops
        record = training_record(
            self.step, self.epoch, loss, self.optimizer.param_groups[0]["lr"], float(grad_norm), meter.snapshot(),
            time.perf_counter() - start_s, peak_memory_mb(self.device),
        )
        if self._skip_nonfinite:
            record["skipped_steps"] = self.skipped_steps
        return record

    def _summary(self, last_record: dict | None, last_val: dict | None) -> None:
        path = self.run_dir / "metrics.jsonl"
        records = read_metrics(path) if path.exists() else []
        plot_line = plot_loss(self.run_dir)
        skipped = self.skipped_steps if self._skip_nonfinite else None
        print(summary_text(self.step, last_record, last_val, records, self.run_dir, plot_line, skipped), file=self.stream, flush=True)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
