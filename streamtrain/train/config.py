"""Run configuration: one dataclass per concern, command-line flags generated from them, TOML/JSON files.

Every field carries a one-line help text and its unit in its metadata; the `streamtrain fit` flags are built
from those (`d_model` -> `--d-model`). Values are resolved in this order, later wins:
dataclass defaults < the resumed run's config.json < `--config FILE` < flags given on the command line.
Field validation lives in each `__post_init__` and names the flag to fix. This module imports no torch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from streamtrain.errors import UserError
from streamtrain.model.config import ModelConfig
from streamtrain.options import check_finite_floats, flag_name, option

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "RunConfig",
    "SECTIONS",
    "add_flags",
    "flag_values",
    "read_config_file",
    "resolve_config",
    "write_config",
    "parse_synthetic",
    "parse_weights",
    "COMPILE_MAX_SHAPES",
    "DERIVED_KEY",
]

COMPILE_MAX_SHAPES = 16  # default --max-shapes with --compile: each padded length T costs a compilation


@dataclass
class DataConfig:
    data: str | list | None = option(
        None, "dataset folder (index.json + shards) or a folder of raw JSON/JSONL files; repeat it to mix several "
        "sources by --weights", "path", repeat=True,
    )
    weights: str | None = option(
        None, "with several --data: each source's share of an epoch's real tokens, in --data order, e.g. 0.7,0.3 "
        "(default: every source's own size, one pass over each)", "w1,w2,...",
    )
    synthetic: str | None = option(None, "train on N generated sequences of length L instead of --data", "N,L")
    val_data: str | None = option(None, "dataset folder used for validation", "path")
    val_fraction: float = option(0.0, "share of sequences held out for validation, split by sequence id", "fraction")
    batch_tokens: int = option(4096, "padded tokens per micro-batch (length-bucketed batches)", "tokens")
    batch: int | None = option(
        None, "at most this many sequences per micro-batch (batches still hold at most --batch-tokens padded tokens)",
        "sequences",
    )
    max_len: int | None = option(None, "longer sequences are split into windows of at most L vectors, overlapping by one (default: as many as --batch-tokens holds)", "vectors")
    num_workers: int | None = option(
        None, "data loader worker processes (0: load in the training process; default 0 on CPU, where the model's threads use every core, 2 on CUDA)", "processes"
    )
    max_shapes: int | None = option(
        None,
        "most distinct padded lengths T of the training batches (default: 16 with --compile, which compiles "
        "one graph per T, else the loader's 128); fewer shapes round more sequences up further, so more of "
        "every batch is padding",
        "shapes",
    )
    window: int | None = option(
        None, "shards per window of the epoch plan: batches are formed inside a window (and the one before), so "
        "a rank reads a few shards at a time; larger shuffles more widely and fills batches better, smaller needs "
        "less cache (default: about 256 MB of shards)", "shards",
    )
    cache_dir: str | None = option(
        None, "for s3:// / gs:// data: the node-local shard cache, shared by the ranks of a node (default: the user "
        "cache's remote/)", "path",
    )
    cache_limit: str | None = option(
        None, "for remote data: most bytes the cache holds, e.g. 20GB; at least what a rank reads at once "
        "(default: no limit)", "size",
    )
    prefetch_threads: int | None = option(
        None, "for remote data: shard downloads in flight per loader process (default: one per two cores, 1 to "
        "4; more overlap requests on a slow network, but each costs the loader CPU)", "threads",
    )
    verify: bool = option(
        True,
        "check each shard's and the lengths file's sha256 against index.json before their rows are used, in "
        "every loader process, hashing only file versions not verified before (--no-verify: storage you trust)",
    )

    def __post_init__(self) -> None:
        check_finite_floats(self)
        if isinstance(self.data, list):
            if not self.data:
                raise UserError("--data: no dataset given")
            if len(self.data) == 1:
                self.data = self.data[0]
        if self.weights is not None:
            parse_weights(self.weights, len(self.sources()))
        if self.window is not None and self.window < 1:
            raise UserError(f"--window must be >= 1 shard, got {self.window}")
        if self.prefetch_threads is not None and self.prefetch_threads < 1:
            raise UserError(f"--prefetch-threads must be >= 1, got {self.prefetch_threads}")
        if self.cache_limit is not None:
            from streamtrain.storage.cache import parse_bytes

            parse_bytes(self.cache_limit)
        if self.synthetic is not None:
            parse_synthetic(self.synthetic)
        if not 0.0 <= self.val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.batch_tokens < 8:
            raise UserError(f"--batch-tokens must be >= 8, got {self.batch_tokens}")
        if self.batch is not None and self.batch < 1:
            raise UserError(f"--batch must be >= 1, got {self.batch}")
        if self.max_len is not None and self.max_len < 2:
            raise UserError(f"--max-len must be >= 2, got {self.max_len}")
        if self.max_shapes is not None and self.max_shapes < 1:
            raise UserError(f"--max-shapes must be >= 1, got {self.max_shapes}")
        if self.num_workers is not None and self.num_workers < 0:
            raise UserError(f"--num-workers must be >= 0, got {self.num_workers}")


    def sources(self) -> list[str]:
        """The --data paths, in order (one or several)."""
        if self.data is None:
            return []
        return list(self.data) if isinstance(self.data, list) else [self.data]


def parse_weights(spec: str, num_sources: int) -> list[float]:
    """'0.7,0.3' -> [0.7, 0.3]: one finite weight > 0 per --data source."""
    try:
        weights = [float(p) for p in str(spec).split(",")]
    except ValueError:
        raise UserError(f"--weights expects comma-separated numbers, got {spec!r}") from None
    if len(weights) != num_sources:
        raise UserError(f"--weights {spec}: {len(weights)} weights for {num_sources} --data sources")
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise UserError(f"--weights {spec}: every weight must be a finite number > 0")
    return weights


@dataclass
class OptimConfig:
    lr: float = option(1e-3, "peak learning rate of AdamW, reached after the warmup", "per step")
    min_lr_fraction: float = option(0.1, "learning rate at the end of the cosine decay, as a fraction of --lr", "fraction")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay on matrices (never on norms or biases)", "per step")
    beta1: float = option(0.9, "AdamW first-moment decay", "")
    beta2: float = option(0.95, "AdamW second-moment decay", "")
    warmup_steps: int | None = option(None, "linear learning-rate warmup length (default: min(100, a tenth of the schedule))", "steps")
    decay_steps: int | None = option(
        None, "step at which the cosine decay ends (default: the run's total steps; fix it to extend a run by resuming)", "steps"
    )
    clip: float = option(1.0, "clip the global gradient norm to this value (0 or inf: no clipping)", "L2 norm", inf_ok=True)

    def __post_init__(self) -> None:
        check_finite_floats(self)
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            raise UserError(f"--min-lr-fraction must be in [0, 1], got {self.min_lr_fraction}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{flag_name(name)} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise UserError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise UserError(f"--decay-steps must be >= 1, got {self.decay_steps}")
        if self.clip < 0:
            raise UserError(f"--clip must be >= 0, got {self.clip}")


@dataclass
class TrainConfig:
    out: str | None = option(None, "run folder: config.json, metrics.jsonl, checkpoints/, loss.png", "path")
    epochs: int | None = option(None, "passes over the training data (default 1 unless --max-steps is given)", "epochs")
    max_steps: int | None = option(None, "stop after this many optimizer steps", "steps")
    max_seconds: float | None = option(
        None,
        "also stop, with checkpoints and a final validation, at the first step after this much training time; "
        "the learning-rate schedule still follows --epochs/--max-steps",
        "seconds",
    )
    grad_accum: int = option(1, "micro-batches per optimizer step", "micro-batches")
    seed: int = option(0, "seed of the model init, the data order and the synthetic data", "")
    device: str = option("auto", "auto (cuda if available), cpu or cuda", "")
    amp: bool = option(False, "mixed precision: bf16 where the hardware has it natively, else fp16 (CUDA) or fp32")
    precision: str | None = option(None, "force fp32, bf16 or fp16 (overrides --amp)", "")
    compile: bool = option(
        False,
        "compile the model with torch.compile: one graph per padded length T (the batch size is dynamic), "
        "so batches use at most --max-shapes lengths",
    )
    fsdp: bool = option(
        False,
        "under torchrun, shard parameters, gradients and optimizer state over the ranks (FSDP2) instead of "
        "replicating them (DDP): for models whose training state does not fit one device; checkpoints stay "
        "whole, so they load at any world size",
    )
    log_every: int = option(10, "write a metrics line every N steps", "steps")
    eval_every: int = option(0, "validate every N steps (0: only at the end)", "steps")
    save_every: int = option(500, "write checkpoints/last.pt every N steps (0: only at the end)", "steps")
    dist_timeout: float = option(
        120.0,
        "under torchrun, a collective that waits longer fails the job (NCCL's own default is 600 s); a rank that "
        "finds another lost exits with one line naming it. Raise it when a checkpoint save or a compilation "
        "on one rank takes longer",
        "seconds",
    )
    peak_tflops: float | None = option(None, "peak of the hardware for MFU (default: measured on CPU, table on GPU)", "TFLOP/s")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice)", "threads")
    quiet: bool = option(False, "print only errors and the final summary")
    nonfinite: str = option(
        "stop",
        "on a NaN/Inf training loss: stop (exit code 3; checkpoints/last.pt keeps the last good weights) or skip "
        "that step's update and go on (counted as skipped_steps in metrics.jsonl)",
        "stop|skip",
    )
    nonfinite_limit: int = option(
        10, "with --nonfinite skip, stop after this many consecutive non-finite steps", "steps"
    )
    tensorboard: bool = option(False, "also write the metrics.jsonl scalars as TensorBoard events in RUN/tensorboard/ (needs the tensorboard package)")
    keep_checkpoints: int = option(
        0, "also keep the newest N checkpoints as checkpoints/step-STEP.pt (best.pt and last.pt always; 0: only those)", "checkpoints"
    )
    patience: int | None = option(
        None, "stop early when validation (every --eval-every steps) has not improved for N evaluations in a row", "evaluations"
    )
    ema: float | None = option(
        None, "keep an exponential moving average of the weights with this decay per step, validated and saved beside them", "decay"
    )

    def __post_init__(self) -> None:
        check_finite_floats(self)
        for name in ("epochs", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise UserError(f"--max-seconds must be > 0, got {self.max_seconds}")
        for name in ("grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"{flag_name(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise UserError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.precision not in (None, "fp32", "bf16", "fp16"):
            raise UserError(f"--precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.dist_timeout <= 0:
            raise UserError(f"--dist-timeout must be > 0, got {self.dist_timeout}")
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise UserError(f"--peak-tflops must be > 0, got {self.peak_tflops}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        if self.fsdp and self.compile:
            raise UserError("--fsdp and --compile together are not supported yet: drop one of them")
        if self.nonfinite not in ("stop", "skip"):
            raise UserError(f"--nonfinite must be stop or skip, got {self.nonfinite!r}")
        if self.nonfinite_limit < 1:
            raise UserError(f"--nonfinite-limit must be >= 1, got {self.nonfinite_limit}")
        if self.keep_checkpoints < 0:
            raise UserError(f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.patience is not None and self.patience < 1:
            raise UserError(f"--patience must be >= 1, got {self.patience}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise UserError(f"--ema must be in (0, 1), got {self.ema}")


SECTIONS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig}


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_json(self) -> dict:
        return {name: asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_json(cls, obj: dict, source: str = "config") -> "RunConfig":
        values = _flatten(obj, source)
        return cls(**{name: _build(klass, values, source) for name, klass in SECTIONS.items()})

    def check_complete(self) -> None:
        """Cross-section checks that need the merged config."""
        if self.train.out is None:
            raise UserError("--out RUN is required (the run folder)")
        if self.data.data is None and self.data.synthetic is None:
            raise UserError("no training data: give --data DIR (dataset or JSON/JSONL folder) or --synthetic N,L")
        if self.data.data is not None and self.data.synthetic is not None:
            raise UserError("give either --data or --synthetic, not both")
        if self.data.val_data is not None and self.data.val_fraction > 0:
            raise UserError("give either --val-data or --val-fraction, not both")
        if len(self.data.sources()) > 1 and self.data.val_fraction > 0:
            raise UserError("--val-fraction splits one dataset; with several --data sources give --val-data")
        if self.train.patience is not None:
            if self.data.val_data is None and self.data.val_fraction == 0:
                raise UserError("--patience needs validation data: give --val-data DIR or --val-fraction F")
            if not self.train.eval_every:
                raise UserError("--patience needs --eval-every N (validation during the run)")


def parse_synthetic(spec: str) -> tuple[int, int]:
    """'N,L' -> (N sequences, L vectors each)."""
    parts = str(spec).split(",")
    try:
        n, length = (int(p) for p in parts)
    except ValueError:
        raise UserError(f"--synthetic expects N,L (two integers: sequences, length), got {spec!r}") from None
    if n < 1 or length < 2:
        raise UserError(f"--synthetic N,L needs N >= 1 and L >= 2, got {spec!r}")
    return n, length


# ---------------------------------------------------------------------------------------------------------
# Flags


def _base_type(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _hints(klass: type) -> dict[str, type]:
    return {name: _base_type(tp) for name, tp in typing.get_type_hints(klass).items()}


def add_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """Add one flag per field of the given sections. Unset flags stay absent from the namespace
    (default=SUPPRESS), so a flag given on the command line is distinguishable from a default."""
    for section in sections:
        klass = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options")
        hints = _hints(klass)
        for f in fields(klass):
            if not f.metadata.get("flag", True):
                continue
            tp = hints[f.name]
            unit = f.metadata.get("unit")
            default = f.default if f.default is not MISSING else None
            help_text = f.metadata["help"] + (f" [{unit}]" if unit else "")
            if default not in (None, False):
                help_text += f" (default {default})"
            kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
            if tp is bool:
                kwargs["action"] = argparse.BooleanOptionalAction
            elif f.metadata.get("repeat"):  # a str, or a list of them when the flag is repeated
                kwargs.update(action="append", type=tp, metavar=unit or f.name.upper())
            elif typing.get_origin(tp) is list:  # a repeatable flag
                kwargs["action"] = "append"
                kwargs["metavar"] = unit or f.name.upper()
            else:
                kwargs["type"] = tp
                kwargs["metavar"] = unit if unit and "," in unit else f.name.upper()
            group.add_argument(flag_name(f.name), **kwargs)


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, by field name."""
    names = {f.name for klass in SECTIONS.values() for f in fields(klass)}
    return {k: v for k, v in vars(args).items() if k in names}


# ---------------------------------------------------------------------------------------------------------
# Files


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a TOML (.toml) or JSON file into field values; keys may be flat or grouped by section."""
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
    except OSError as e:
        raise UserError(f"--config {path}: cannot read ({e.strerror})") from None
    try:
        if path.suffix.lower() == ".toml":
            obj = _toml_module(path).loads(raw_bytes.decode())
        else:
            obj = json.loads(raw_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--config {path}: not valid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"--config {path}: expected a table/object at the top level")
    return _flatten(obj, f"--config {path}")


def _toml_module(path: Path):
    """tomllib (Python 3.11+), else its backport tomli (the same API)."""
    try:
        import tomllib

        return tomllib
    except ImportError:
        pass
    try:
        import tomli

        return tomli
    except ImportError:
        raise UserError(
            f"--config {path}: reading TOML needs Python 3.11+ or the tomli package (pip install tomli); "
            "or give the options as a JSON file"
        ) from None


# RUN/config.json's record of what fit derived from the config and the machine (the --amp precision): kept
# next to the options for the reader, never read back as one, so config.json stays a valid --config file.
DERIVED_KEY = "derived"


def _flatten(obj: dict, source: str) -> dict[str, Any]:
    owner = {f.name: section for section, klass in SECTIONS.items() for f in fields(klass)}
    values: dict[str, Any] = {}
    for key, value in obj.items():
        if key == DERIVED_KEY:
            continue
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                name = sub_key.replace("-", "_")
                if owner.get(name) != key:
                    raise UserError(f"{source}: unknown key {key}.{sub_key!s}")
                values[name] = sub_value
            continue
        name = key.replace("-", "_")
        if name not in owner:
            raise UserError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(owner))})")
        values[name] = value
    return values


def _check_type(name: str, value: Any, tp: type, source: str, repeat: bool = False) -> Any:
    if value is None:
        return None
    if repeat and isinstance(value, list):
        if not all(isinstance(v, tp) for v in value):
            raise UserError(f"{source}: {name} must be a {tp.__name__} or a list of them, got {value!r}")
        return value
    if typing.get_origin(tp) is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{source}: {name} must be a list of strings, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool) or tp is not bool and isinstance(value, bool):
        raise UserError(f"{source}: {name} must be {tp.__name__}, got {value!r}")
    if not isinstance(value, tp):
        raise UserError(f"{source}: {name} must be {tp.__name__}, got {value!r}")
    return value


def _build(klass: type, values: dict[str, Any], source: str):
    hints = _hints(klass)
    kwargs = {f.name: _check_type(f.name, values[f.name], hints[f.name], source, f.metadata.get("repeat", False))
              for f in fields(klass) if f.name in values}
    return klass(**kwargs)


def resolve_config(
    flags: dict[str, Any], file_values: dict[str, Any] | None = None, base: dict[str, Any] | None = None
) -> RunConfig:
    """Merge base (a resumed run's config.json, flattened) < file values < flags into a validated RunConfig."""
    values: dict[str, Any] = {}
    if base:
        values.update(_flatten(base, "checkpoint config"))
    values.update(file_values or {})
    values.update(flags)
    return RunConfig(**{name: _build(klass, values, "config") for name, klass in SECTIONS.items()})


def write_config(path: str | os.PathLike, config: RunConfig, derived: dict[str, Any] | None = None) -> None:
    """Write RUN/config.json atomically (it is also a valid --config file). `derived`: what the run chose
    from the config and the machine, kept under DERIVED_KEY, which reading the file skips."""
    from streamtrain.dataset import atomic_write_json

    obj = config.to_json()
    if derived:
        obj[DERIVED_KEY] = derived
    atomic_write_json(path, obj)
