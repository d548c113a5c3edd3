"""The Trainer: standardization, the masked next-step loss, gradient accumulation, mixed precision,
AdamW + warmup/cosine, clipping, validation, checkpoints with exact resume, signals, DDP, and telemetry.

Loss of one optimizer step over K micro-batches (and every rank under DDP):

    loss = sum over micro-batches, sequences b, positions t with t + 1 < length_b, dims d of
               (model(x_std)[b, t, d] - x_std[b, t + 1, d])^2
           / (number of such (t, d) entries in the whole step)

i.e. one mean over the step's valid targets, not a mean of per-batch means: a micro-batch of short sequences
weighs exactly its share of targets. The count is known before any backward because the K micro-batches are
fetched first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import resource
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist

from streamtrain.amp import build_precision
from streamtrain.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint, unwrap_model
from streamtrain.config import ModelConfig, RunConfig, read_config_file, resolve_config, write_config
from streamtrain.dataprep import TrainData, prepare_data
from streamtrain.errors import UserError
from streamtrain.evaluate import EvalSums, accumulate_eval, eval_summary, standardization
from streamtrain.metrics import LiveView, MetricsLog, ThroughputMeter, gpu_peak_tflops, measure_matmul_peak_tflops, plot_loss
from streamtrain.model import CausalTransformer
from streamtrain.optim import build_optimizer, lr_at, set_lr

__all__ = ["Trainer", "DistInfo", "TrainingDiverged", "masked_sq_error", "valid_target_count", "run_fit", "EXIT_DIVERGED"]

EXIT_DIVERGED = 3  # the loss became NaN/Inf; last.pt still holds the last good weights
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


_HORIZON_PROBE_STEPS = 20  # steps timed before --max-seconds sets the schedule's horizon


class TrainingDiverged(UserError):
    """The loss became NaN or Inf."""


def masked_sq_error(pred: torch.Tensor, x_std: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of squared next-step errors over valid targets, in fp32.

    pred, x_std: (B, T, D); mask: (B, T) True on real vectors. Position t predicts x_std[t+1] and counts
    when t+1 is real (right padding: then t is real too)."""
    diff = pred[:, :-1].float() - x_std[:, 1:].float()  # (B, T-1, D)
    return diff.square().masked_fill(~mask[:, 1:, None], 0.0).sum()


def valid_target_count(lengths: torch.Tensor, dim: int) -> int:
    """Number of (position, dim) loss terms of a micro-batch: sum over sequences of (length - 1) * dim."""
    return int((lengths - 1).clamp(min=0).sum()) * dim


def _sum_squares(lengths: torch.Tensor) -> int:
    l64 = lengths.to(torch.int64)
    return int((l64 * l64).sum())


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _setup_distributed(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) join the process group: nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    device = torch.device(f"cuda:{info.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return info, device


class Trainer:
    """Build with a resolved RunConfig and prepared data; `fit()` runs to the end (or a signal) and returns
    the exit code."""

    def __init__(
        self,
        cfg: RunConfig,
        data: TrainData,
        run_dir: Path,
        device: torch.device,
        dist_info: DistInfo = DistInfo(),
        checkpoint: dict | None = None,
        stream=None,
    ):
        self.cfg = cfg
        self.data = data
        self.run_dir = Path(run_dir)
        self.device = device
        self.dist = dist_info
        self.stream = stream or sys.stdout
        self.ckpt_dir = self.run_dir / "checkpoints"
        t = cfg.train

        seed = t.seed
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        import random

        random.seed(seed)

        self.mean, self.std = standardization(data.index.mean, data.index.std)
        self._mean_t = torch.as_tensor(self.mean, dtype=torch.float32, device=device)
        self._inv_std_t = torch.as_tensor(1.0 / self.std, dtype=torch.float32, device=device)

        self.model = CausalTransformer(cfg.model).to(device)
        self.num_params = self.model.num_params()
        self.precision = build_precision(device, t.amp, t.precision)
        self.optimizer = build_optimizer(self.model, cfg.optim, device.type)
        self.train_model: torch.nn.Module = self.model
        if t.compile:
            self.train_model = torch.compile(self.model, dynamic=False)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.train_model, device_ids=[device.index] if device.type == "cuda" else None
            )

        self.train_stream, self.loader = self._make_loader(data.train_root, data.train_ids, shuffle=True)
        self.val_loader = None
        if data.val_root is not None:
            _, self.val_loader = self._make_loader(data.val_root, data.val_ids, shuffle=False)
            self._val_index_mean = (
                data.index.mean if data.val_root == data.train_root else _read_mean(data.val_root)
            )

        self.steps_per_epoch = math.ceil(_num_batches(self.train_stream, self.loader) / t.grad_accum)
        if self.steps_per_epoch == 0:
            raise UserError(f"{data.train_root}: no batch fits --batch-tokens {cfg.data.batch_tokens}")
        self.max_epochs = t.epochs if t.epochs is not None else (None if t.max_steps is not None else 1)
        limits = [t.max_steps] if t.max_steps is not None else []
        if self.max_epochs is not None:
            limits.append(self.max_epochs * self.steps_per_epoch)
        self.total_steps = min(limits)
        self.decay_steps = cfg.optim.decay_steps or self.total_steps
        # With --max-seconds and no --decay-steps the horizon is re-estimated from the measured step time
        # once, after _HORIZON_PROBE_STEPS steps, so that the cosine ends when time runs out.
        self._estimate_horizon = t.max_seconds is not None and cfg.optim.decay_steps is None
        self._default_warmup = cfg.optim.warmup_steps is None
        if self._default_warmup:  # default: a tenth of the schedule, at most 100 steps
            cfg.optim.warmup_steps = min(100, self.decay_steps // 10)

        self.step = 0
        self.epoch = 0
        self.best_val_loss: float | None = None
        self._loader_state: dict | None = None
        self._resumed = False
        if checkpoint is not None:
            self._restore(checkpoint)
        self._stop_signal: int | None = None

    # ------------------------------------------------------------------------------------------------- setup

    def _make_loader(self, root: Path, ids: np.ndarray | None, shuffle: bool):
        from streamtrain.data import ShardStream, make_loader

        d = self.cfg.data
        params = inspect.signature(ShardStream).parameters
        kwargs: dict[str, Any] = dict(
            max_tokens=d.batch_tokens, seed=self.cfg.train.seed, shuffle=shuffle, rank=self.dist.rank, world_size=self.dist.world_size
        )
        if d.batch is not None:
            if "max_sequences" in params:
                kwargs["max_sequences"] = d.batch
            else:
                # Without a per-batch sequence cap, B sequences of the median bucket length fill the budget.
                lengths = np.asarray(_read_lengths(root))
                median = int(np.median(lengths)) if len(lengths) else 8
                kwargs["max_tokens"] = d.batch * max(8, -(-median // 8) * 8)
        if d.max_len is not None:
            if "max_len" not in params:
                raise UserError("--max-len is not supported by this version of streamtrain.data")
            kwargs["max_len"] = d.max_len
        if ids is not None:
            if "ids" not in params:
                raise UserError("--val-fraction needs ShardStream(ids=...), not supported by this streamtrain.data")
            kwargs["ids"] = ids
        stream = ShardStream(str(root), **kwargs)
        num_workers = d.num_workers if d.num_workers is not None else (0 if self.device.type == "cpu" else 2)
        loader = make_loader(stream, num_workers=num_workers, pin_memory=self.device.type == "cuda")
        return stream, loader

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.precision.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.best_val_loss = ckpt.get("best_val_loss")
        self._loader_state = ckpt["loader"]
        scheduler = ckpt.get("scheduler", {})
        if scheduler.get("estimated") and self.cfg.optim.decay_steps is None:
            self.decay_steps = int(scheduler["decay_steps"])  # keep the horizon the time limit gave
            self._estimate_horizon = False
        self._resumed = True
        restore_rng_state(ckpt["rng"])

    def _checkpoint(self) -> dict:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler.is_enabled() else {},
            "scheduler": {
                "kind": "warmup_cosine",
                "decay_steps": self.decay_steps,
                "estimated": self.cfg.optim.decay_steps is None and self.cfg.train.max_seconds is not None,
            },
            "step": self.step,
            "epoch": self.epoch,
            "loader": self.loader.state_dict(),
            "rng": capture_rng_state(),
            "config": self.cfg.to_json(),
            "stats": {"mean": self.mean.tolist(), "std": self.std.tolist()},
            "best_val_loss": self.best_val_loss,
            "num_params": self.num_params,
        }

    def _save(self, name: str) -> None:
        # The loss of a step is computed before its update, so check the weights themselves: a checkpoint
        # must never hold NaN/Inf weights.
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        self._check_finite(float(torch.stack(norms).sum()), "the weights' norm")
        if self.dist.is_main:
            save_checkpoint(self.ckpt_dir / name, self._checkpoint())

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
            it = iter(self.loader)
            while True:
                group = []
                t0 = time.perf_counter()
                for _ in range(K):
                    try:
                        group.append(self._next(it))
                    except StopIteration:
                        break
                wait_s = time.perf_counter() - t0
                if group:
                    yield epoch, group, wait_s
                if len(group) < K:
                    break

    # ------------------------------------------------------------------------------------------------- step

    def _standardize(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ((x - self._mean_t) * self._inv_std_t).masked_fill(~mask[..., None], 0.0)

    def _train_step(self, group: list) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over the micro-batches of `group`; returns (loss, grad_norm) as tensors
        (no host sync here)."""
        loss = self.accumulate_gradients(group)
        scaler = self.precision.scaler
        scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.clip if self.cfg.optim.clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)
        set_lr(self.optimizer, lr_at(self.step, self.cfg.optim, self.decay_steps))
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def accumulate_gradients(self, group: list) -> torch.Tensor:
        """Forward + backward of every micro-batch of `group`, normalized by the step's global count of
        valid targets; returns the step loss (detached)."""
        D = self.cfg.model.dim
        count = sum(valid_target_count(b.lengths, D) for b in group)
        if self.dist.enabled:
            t = torch.tensor([count], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            count = int(t.item())
        # DDP averages gradients over ranks; multiplying by world_size turns that average into the global sum.
        scale = self.dist.world_size / max(count, 1)
        loss_total = torch.zeros((), device=self.device)
        for i, batch in enumerate(group):
            x = batch.x.to(self.device, non_blocking=True)
            mask = batch.mask.to(self.device, non_blocking=True)
            x_std = self._standardize(x, mask)
            sync_ctx = (
                self.train_model.no_sync() if self.dist.enabled and i < len(group) - 1 else contextlib.nullcontext()
            )
            with sync_ctx:
                with self.precision.autocast():
                    pred = self.train_model(x_std)
                loss = masked_sq_error(pred, x_std, mask) * scale
                self.precision.scaler.scale(loss).backward()
            loss_total += loss.detach()
        return loss_total / self.dist.world_size

    # ------------------------------------------------------------------------------------------------- validation

    def validate(self) -> dict:
        assert self.val_loader is not None
        sums = EvalSums(self.cfg.model.dim, self.device)
        accumulate_eval(
            self.model, self._iter_isolated(self.val_loader), sums, self.mean, self.std,
            self._val_index_mean, self.device, self.precision.autocast,
        )
        if self.dist.enabled:
            packed = sums.as_tensor()
            dist.all_reduce(packed)
            sums.load_tensor(packed)
        return eval_summary(sums)

    # ------------------------------------------------------------------------------------------------- loop

    def _peak_flops_per_s(self) -> float | None:
        t = self.cfg.train
        if t.peak_tflops is not None:
            return t.peak_tflops * 1e12
        if self.device.type == "cpu":
            # the peak of the precision trained in (fp16 autocast on CPU is emulated: quote it against fp32)
            dtype = self.precision.dtype if self.precision.name == "bf16" else torch.float32
            return measure_matmul_peak_tflops(dtype=dtype) * 1e12
        return (gpu_peak_tflops(torch.cuda.get_device_name(self.device), self.precision.name) or 0) * 1e12 or None

    def _install_signals(self):
        if not _in_main_thread():  # signal handlers can only be installed from the main thread
            return {}
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum
            self._view.print(f"{signal.Signals(signum).name}: finishing the current step, then saving")

        for sig in _SIGNAL_EXIT:
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            last = self.ckpt_dir / "last.pt"
            keep = f"; {last} holds the last good weights" if last.exists() else ""
            raise TrainingDiverged(
                f"{what} became {value} by step {self.step}{keep}. Lower --lr, raise --warmup-steps, "
                "set --clip, or use --precision fp32"
            )

    def fit(self) -> int:
        t = self.cfg.train
        is_main = self.dist.is_main
        self._view = LiveView(self.total_steps, self.step, quiet=t.quiet or not is_main, stream=self.stream)
        view = self._view
        view.print(
            f"model: {self.num_params / 1e6:.2f}M parameters | device {self.device} | precision {self.precision.name}: "
            f"{self.precision.reason}"
        )
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if self._resumed else None, enabled=is_main)
        meter = ThroughputMeter(self._peak_flops_per_s())
        previous_handlers = self._install_signals()
        C, L, N = self.cfg.model.d_model, self.cfg.model.layers, self.num_params
        start_s = time.perf_counter()
        loss_acc = torch.zeros((), device=self.device)
        steps_acc = 0
        grad_norm = torch.zeros(())
        last_record: dict | None = None
        last_val: dict | None = None
        saved_step = self.step
        exit_code = 0
        try:
            if self.step >= self.total_steps:
                view.print(f"nothing to do: step {self.step} already reached --max-steps/--epochs ({self.total_steps})")
            for epoch, group, wait_s in self._step_groups() if self.step < self.total_steps else ():
                self.epoch = epoch
                loss, grad_norm = self._train_step(group)
                self.step += 1
                real = sum(int(b.lengths.sum()) for b in group)
                padded = sum(b.mask.numel() for b in group)
                # PaLM appendix B per sequence of length l: l * (6N + 12 L C l).
                flops = 6.0 * N * real + 12.0 * L * C * sum(_sum_squares(b.lengths) for b in group)
                meter.add(real, padded, wait_s, flops)
                loss_acc += loss
                steps_acc += 1
                view.advance(self.step)
                if self._estimate_horizon and self.step == _HORIZON_PROBE_STEPS:
                    self._set_horizon_from_time(start_s)
                last_step = self.step >= self.total_steps or self._time_is_up(start_s)
                record = None
                if self.step % t.log_every == 0 or last_step:
                    record = self._log_record(loss_acc, steps_acc, grad_norm, meter, start_s)
                    loss_acc.zero_()
                    steps_acc = 0
                if self.val_loader is not None and ((t.eval_every and self.step % t.eval_every == 0) or last_step):
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
                    if record is None or "loss" not in record:
                        self._check_finite(float(loss), "training loss")
                    save_start_s = time.perf_counter()
                    self._save("last.pt")
                    meter.exclude(time.perf_counter() - save_start_s)
                    saved_step = self.step
                if stop:
                    code = _SIGNAL_EXIT.get(self._stop_signal, 130)
                    view.close()
                    print(
                        f"streamtrain fit: stopped by {signal.Signals(self._stop_signal).name} at step {self.step}; "
                        f"saved {self.ckpt_dir / 'last.pt'} (continue with --resume)",
                        file=sys.stderr,
                    )
                    exit_code = code
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

    def _set_horizon_from_time(self, start_s: float) -> None:
        elapsed_s = time.perf_counter() - start_s
        if self.dist.enabled:  # one horizon for all ranks: the slowest rank's estimate
            t = torch.tensor([elapsed_s], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            elapsed_s = float(t)
        per_step_s = elapsed_s / max(self.step, 1)
        fits = self.step + int((self.cfg.train.max_seconds - elapsed_s) / per_step_s)
        self.decay_steps = max(self.step + 1, min(self.total_steps, fits))
        if self._default_warmup:
            self.cfg.optim.warmup_steps = min(self.cfg.optim.warmup_steps, max(self.step, self.decay_steps // 10))
        self._view.print(
            f"--max-seconds {self.cfg.train.max_seconds:g}: {per_step_s * 1e3:.0f} ms/step, "
            f"learning-rate schedule set to end at step {self.decay_steps}"
        )

    def _time_is_up(self, start_s: float) -> bool:
        limit_s = self.cfg.train.max_seconds
        if limit_s is None:
            return False
        up = time.perf_counter() - start_s >= limit_s
        if self.dist.enabled:  # every rank must stop at the same step, whatever its own clock says
            t = torch.tensor([1.0 if up else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            up = t.item() > 0
        if up and self.step < self.total_steps:
            self._view.print(f"time limit reached: --max-seconds {limit_s:g} at step {self.step} of {self.total_steps}")
        return up

    def _stop_requested(self) -> bool:
        flag = self._stop_signal is not None
        if self.dist.enabled:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if t.item() > 0 and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
            return t.item() > 0
        return flag

    def _log_record(self, loss_acc, steps_acc, grad_norm, meter, start_s) -> dict:
        loss_t = loss_acc.clone()
        if self.dist.enabled:
            dist.all_reduce(loss_t)
            loss_t /= self.dist.world_size
        loss = float(loss_t) / max(steps_acc, 1)
        self._check_finite(loss, "training loss")
        if self.dist.enabled:  # throughput of the whole job, not of rank 0
            counts = torch.tensor([meter.real_tokens, meter.padded_tokens, meter.flops], dtype=torch.float64, device=self.device)
            dist.all_reduce(counts)
            meter.real_tokens, meter.padded_tokens, meter.flops = int(counts[0]), int(counts[1]), float(counts[2])
        rates = meter.snapshot()
        if self.device.type == "cuda":
            peak_mem_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak_mem_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return {
            "step": self.step,
            "epoch": self.epoch,
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "grad_norm": float(grad_norm),
            **rates,
            "elapsed_s": time.perf_counter() - start_s,
            "peak_mem_mb": peak_mem_mb,
        }

    def _summary(self, last_record: dict | None, last_val: dict | None) -> None:
        records = []
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            from streamtrain.metrics import read_metrics

            records = read_metrics(path)
        rates = [r["real_tokens_per_s"] for r in records if r.get("real_tokens_per_s")]
        plot_line = plot_loss(self.run_dir)
        lines = [
            f"done: {self.step} steps | final loss {last_record['loss']:.4g}" if last_record else f"done: {self.step} steps",
        ]
        if last_val is not None:
            lines.append(
                f"validation: mse {last_val['mse']:.4g} (original units) | skill vs persistence "
                f"{_fmt(last_val['skill_vs_persistence'])} | vs mean {_fmt(last_val['skill_vs_mean'])}"
            )
        if rates:
            lines.append(f"median real tokens/s: {statistics.median(rates):.0f}")
        lines.append(f"run folder: {self.run_dir}")
        lines.append(plot_line)
        print("\n".join(lines), file=self.stream, flush=True)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _num_batches(stream, loader) -> int:
    for get in (lambda: len(loader), lambda: stream.num_batches()):
        try:
            return int(get())
        except (TypeError, AttributeError, NotImplementedError):
            continue
    raise UserError("streamtrain.data does not report its number of batches (len(loader)); pass --max-steps")


def _read_lengths(root: Path) -> np.ndarray:
    from streamtrain.format import load_lengths, read_index

    return load_lengths(read_index(root))


def _read_mean(root: Path) -> np.ndarray:
    from streamtrain.format import read_index

    return read_index(root).mean


# -------------------------------------------------------------------------------------------------------------
# Entry point used by `streamtrain fit`


def run_fit(flags: dict[str, Any], config_file: str | None = None, resume: bool = False, stream=None) -> int:
    """parse config -> prepare data -> build -> train -> close. Returns the exit code."""
    file_values = read_config_file(config_file) if config_file else {}
    out = flags.get("out", file_values.get("out"))
    if out is None:
        raise UserError("--out RUN is required (the run folder)")
    run_dir = Path(out)
    last = run_dir / "checkpoints" / "last.pt"
    checkpoint = None
    if resume:
        if not last.is_file():
            raise UserError(f"--resume: {last} does not exist (nothing to resume; drop --resume to start a new run)")
        checkpoint = load_checkpoint(last)
    elif last.exists():
        raise UserError(f"{run_dir} already holds a run ({last}); pass --resume to continue it or choose another --out")
    cfg = resolve_config(flags, file_values, base=checkpoint["config"] if checkpoint else None)
    cfg.check_complete(resuming=resume)

    dist_info, device = _setup_distributed(cfg.train.device)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    try:
        if dist_info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            data = prepare_data(cfg, run_dir, is_main=True)
        if dist_info.enabled:
            dist.barrier()
            if not dist_info.is_main:
                data = prepare_data(cfg, run_dir, is_main=False)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=data.index.dim))
        if checkpoint is not None:
            saved = ModelConfig(**checkpoint["config"]["model"])
            if saved != cfg.model:
                diffs = [
                    f"--{f.name.replace('_', '-')} {getattr(cfg.model, f.name)} (checkpoint: {getattr(saved, f.name)})"
                    for f in dataclasses.fields(ModelConfig)
                    if getattr(saved, f.name) != getattr(cfg.model, f.name)
                ]
                raise UserError(f"--resume: model config differs from the checkpoint's: {', '.join(diffs)}")
        if dist_info.is_main:
            write_config(run_dir / "config.json", cfg)
        trainer = Trainer(cfg, data, run_dir, device, dist_info, checkpoint, stream=stream)
        return trainer.fit()
    finally:
        if dist_info.enabled and dist.is_initialized():
            dist.destroy_process_group()
