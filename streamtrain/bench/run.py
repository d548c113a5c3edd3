"""One benchmark run: build (or take) the corpus, measure the chosen stages with their peers and bounds,
and return every figure as one flat dict (nested only for the ablation table and the machine)."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from streamtrain.errors import UserError

__all__ = ["STAGES", "BenchOptions", "Effort", "run_bench", "repo_history_path", "finite_or_none"]

STAGES = ("convert", "loader", "train")


@dataclass(frozen=True)
class Effort:
    """How long each stage measures: repeats, rounds and time budgets."""

    convert_repeats: int
    loader_repeats: int
    memcpy_bytes: int
    train_rounds: int
    train_budget_s: float
    peak_budget_s: float
    peer_sequences: int
    warmup_steps: int


FULL = Effort(convert_repeats=3, loader_repeats=9, memcpy_bytes=256 << 20, train_rounds=5, train_budget_s=3.0,
              peak_budget_s=0.2, peer_sequences=4000, warmup_steps=3)
QUICK = Effort(convert_repeats=1, loader_repeats=1, memcpy_bytes=64 << 20, train_rounds=2, train_budget_s=0.3,
               peak_budget_s=0.05, peer_sequences=1000, warmup_steps=1)


@dataclass
class BenchOptions:
    quick: bool = False
    data: Path | None = None  # a JSON/JSONL folder (converted) or a dataset folder (convert is skipped)
    size_mb: float | None = None  # corpus size to build (default 64, 8 with quick)
    device: str = "auto"
    stages: tuple[str, ...] = STAGES
    corpus: str = "auto"
    model: str = "128x4x512"
    batch_tokens: int = 1024
    max_tokens: int = 8192  # the loader stage's padded-token budget per batch
    ablation: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise UserError(f"--stages: unknown stage {', '.join(unknown) or '(none)'} (known: {', '.join(STAGES)})")
        if self.size_mb is not None and not (self.size_mb > 0 and math.isfinite(self.size_mb)):
            raise UserError(f"--size-mb must be a positive number, got {self.size_mb}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.batch_tokens < 2:
            raise UserError(f"--batch-tokens must be >= 2, got {self.batch_tokens}")
        if "train" in self.stages:  # before any stage runs, not minutes later
            from streamtrain.bench.train_bench import ModelShape

            ModelShape.parse(self.model)


def finite_or_none(obj):
    """`obj` with every NaN/Inf float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def repo_history_path(cwd: Path | None = None) -> Path | None:
    """benchmarks/history.jsonl when the command runs from the streamtrain repository root, else None."""
    cwd = Path(cwd or Path.cwd())
    if (cwd / "benchmarks").is_dir() and (cwd / "streamtrain" / "cli.py").is_file():
        return cwd / "benchmarks" / "history.jsonl"
    return None


def _device(name: str):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here")
    return torch.device(name)


def _dataset_shape(root: Path) -> dict:
    import numpy as np

    from streamtrain.dataset import read_index

    index = read_index(root)
    lengths = np.asarray(index.lengths())
    return {"num_sequences": index.num_sequences, "num_tokens": index.num_tokens, "dim": index.dim,
            "median_length": float(np.median(lengths)), "p99_length": float(np.percentile(lengths, 99)),
            "max_length": int(lengths.max())}


def run_bench(opts: BenchOptions, log: Callable[[str], None] = lambda _: None) -> dict:
    from streamtrain.bench.corpus import build_json_corpus, json_bytes
    from streamtrain.bench.machine import machine_info

    effort = QUICK if opts.quick else FULL
    device = _device(opts.device)
    started = time.perf_counter()
    result: dict = {"benchmark": "bench", "quick": opts.quick, "stages": list(opts.stages)}
    stage_s: dict[str, float] = {}  # wall time of each stage, what --quick's budget is spent on
    saved_cache = os.environ.get("STREAMTRAIN_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="streamtrain-bench-") as tmp:
        work = Path(tmp)
        os.environ["STREAMTRAIN_CACHE_DIR"] = str(work / "cache")  # this run's checksum records stay with it
        try:
            dataset, corpus = None, None
            if opts.data is not None:
                data = Path(opts.data)
                if not data.is_dir():
                    raise UserError(f"--data {data}: no such folder")
                if (data / "index.json").is_file():
                    dataset, result["corpus"] = data, f"dataset {data}"
                else:
                    corpus, result["corpus"] = data, f"JSON/JSONL folder {data} ({json_bytes(data) / 1e6:.1f} MB)"
            else:
                size_mb = opts.size_mb or (8.0 if opts.quick else 64.0)
                t0 = time.perf_counter()
                corpus, result["corpus"] = build_json_corpus(work / "corpus", opts.corpus, size_mb, opts.seed)
                log(f"corpus: {result['corpus']} ({time.perf_counter() - t0:.1f} s)")
            if corpus is not None:
                if "convert" in opts.stages:
                    from streamtrain.bench.convert_bench import measure_convert

                    workers = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2)
                    log(f"convert: {workers} workers vs the stdlib json reader")
                    t0 = time.perf_counter()
                    figures, dataset = measure_convert(corpus, work, workers, effort.convert_repeats)
                    result.update(figures)
                    stage_s["convert"] = time.perf_counter() - t0
                else:
                    from streamtrain.convert import convert

                    dataset = work / "dataset"
                    convert([corpus], dataset, workers=1)
            elif "convert" in opts.stages:
                log("convert: skipped, --data is already a dataset")
            result["dataset"] = _dataset_shape(dataset)
            if "loader" in opts.stages:
                from streamtrain.bench.loader_bench import measure_loader

                log("loader: ShardStream vs seed-style, HF datasets, memcpy")
                t0 = time.perf_counter()
                result.update(measure_loader(dataset, work, max_tokens=opts.max_tokens, repeats=effort.loader_repeats,
                                             peer_sequences=effort.peer_sequences, memcpy_bytes=effort.memcpy_bytes))
                stage_s["loader"] = time.perf_counter() - t0
            if "train" in opts.stages:
                from streamtrain.bench.train_bench import ModelShape, measure_train

                log(f"train: fit vs the seed pipeline{' and the ablation' if opts.ablation else ''} on {device}")
                t0 = time.perf_counter()
                result.update(measure_train(dataset, work, shape=ModelShape.parse(opts.model),
                                            batch_tokens=opts.batch_tokens, device=device,
                                            rounds=effort.train_rounds, budget_s=effort.train_budget_s,
                                            peak_budget_s=effort.peak_budget_s, warmup_steps=effort.warmup_steps,
                                            ablation=opts.ablation))
                stage_s["train"] = time.perf_counter() - t0
        finally:
            if saved_cache is None:
                os.environ.pop("STREAMTRAIN_CACHE_DIR", None)
            else:
                os.environ["STREAMTRAIN_CACHE_DIR"] = saved_cache
    from streamtrain.bench.report import goals_met

    result["goals_met"] = goals_met(result)
    result["stage_s"] = {k: round(v, 2) for k, v in stage_s.items()}
    result["machine"] = machine_info(device)
    result["commit"] = result["machine"]["commit"]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    return finite_or_none(result)
