"""Training throughput of `streamtrain fit` against the seed-style pipeline, side by side in one run; with
`--amp`, of fit with --amp against fp32 at several model sizes.

    python benchmarks/bench_train.py [--data DIR] [--sequences 20000] [--rounds 5]
    python benchmarks/bench_train.py --amp [--sizes 64x2x256,128x4x512,256x4x1024] [--batch-tokens 4096]

Corpus (`--corpus auto`): real instruction sequences from this machine's binaries when it has them
(tools/asm_corpus.py, converted), else heavy-tailed synthetic lengths (lognormal, median ~30, p99 ~1000);
or `--data DIR`. Both pipelines train the same model size (d_model 128, 4 layers, 4 heads, ff 512)
with the same AdamW:

    fit   the Trainer: length-bucketed token-budget batches (--batch-tokens 1024) from ShardStream,
          pre-LN blocks with SDPA(is_causal), masked next-step loss
    seed  nn.TransformerEncoder(norm_first=True, batch_first=True) with a causal mask and a key padding
          mask, random batches of 16 sequences padded to the longest with pad_sequence, fp32

Both warm up first, then alternate: each round times `--fit-steps` fit steps and `--seed-steps` seed steps;
reported rates are medians over rounds. MFU is PaLM-style model FLOPs on real tokens over the fp32 matmul
peak (torch.mm of 1024x1024, median) measured in this run. Prints a table and one JSON line.

`--amp`: for each model size D x L x FF (d_model, layers, ff; 4 heads), two Trainers on the same data,
one built with --amp (its probe measures bf16 against fp32 in a fresh cache folder, so it always runs;
"build s" is that Trainer's build time, probe and data preparation included) and one with --precision
fp32; after a warm-up, rounds alternate `--fit-steps` steps of each. Prints per size what the probe chose and measured, the real tokens/s of both (medians over
rounds) and their ratio: the goal is amp / fp32 >= 1.0 (when the probe picks fp32 both train alike and
the ratio shows the noise). `--batch-tokens` defaults to fit's 4096 there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from corpus import KINDS, build_dataset  # benchmarks/corpus.py

from streamtrain.bench.train_bench import ModelShape, SeedModel, load_sequences
from streamtrain.dataset import load_lengths, read_index
from streamtrain.telemetry import measure_matmul_peak_tflops
from streamtrain.train.checkpoint import unwrap_model
from streamtrain.train.config import resolve_config
from streamtrain.train.dataprep import prepare_data
from streamtrain.train.trainer import Trainer

D_MODEL, LAYERS, HEADS, FF = 128, 4, 4, 512


class SeedPipeline:
    def __init__(self, root: Path, batch_size: int, max_len: int, seed: int):
        index = read_index(root)
        self.sequences = load_sequences(root, max_len)
        self.mean = torch.as_tensor(index.mean, dtype=torch.float32)
        self.std = torch.as_tensor(np.where(index.std > 0, index.std, 1.0), dtype=torch.float32)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.model = SeedModel(index.dim, ModelShape(D_MODEL, LAYERS, HEADS, FF))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def step(self) -> tuple[int, int]:
        picks = self.rng.integers(0, len(self.sequences), size=self.batch_size)
        seqs = [(self.sequences[i] - self.mean) / self.std for i in picks]
        lengths = torch.tensor([len(s) for s in seqs])
        x = nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # (B, T_max, D)
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        pred = self.model(x, ~mask)
        valid = mask[:, 1:, None]
        loss = ((pred[:, :-1] - x[:, 1:]) ** 2 * valid).sum() / (valid.sum() * x.shape[2])
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return int(lengths.sum()), x.shape[0] * x.shape[1]


def _trainer(root: Path, run_dir: Path, args, **flags) -> Trainer:
    """A Trainer of `streamtrain fit` on the dataset `root` with these config flags (on top of the
    benchmark's), as the CLI builds it."""
    flags = {"data": str(root), "out": str(run_dir), "batch_tokens": args.batch_tokens, "num_workers": args.num_workers,
             "max_steps": 10**9, "quiet": True, "lr": 1e-3, **flags}
    cfg = resolve_config(flags)
    data = prepare_data(cfg, run_dir, is_main=True)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=data.index.dim))
    return Trainer(cfg, data, run_dir, torch.device("cpu"))


def _stepper(trainer: Trainer):
    """run(n): n optimizer steps of `trainer` -> (real tokens, model FLOPs, seconds)."""
    groups = trainer._step_groups()
    model_flops = unwrap_model(trainer.model).train_flops

    def run(n):
        real = 0
        flops = 0.0
        t0 = time.perf_counter()
        for _ in range(n):
            _, group, _ = next(groups)
            trainer._train_step(group)
            trainer.step += 1
            for b in group:
                real += int(b.lengths.sum())
                flops += model_flops(b.lengths)
        return real, flops, time.perf_counter() - t0

    return run


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    try:
        sizes = [tuple(int(v) for v in part.split("x")) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(size) != 3 for size in sizes):
        raise SystemExit(f"--sizes: expected D x L x FF[,...] such as 128x4x512, got {text!r}")
    return sizes


def amp_check(args) -> int:
    """fit --amp against fp32, per model size: the probe's choice and the real tokens/s of both."""
    sizes = _parse_sizes(args.sizes)
    args.batch_tokens = args.batch_tokens or 4096
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["STREAMTRAIN_CACHE_DIR"] = str(tmp / "cache")  # the probe measures, never reads a cache
        root = Path(args.data) if args.data else tmp / "corpus"
        corpus_text = f"dataset {root}"
        if not args.data:
            corpus_text = build_dataset(root, args.corpus, num_sequences=args.sequences, real_mb=args.real_mb, dim=args.dim)
            print(f"corpus: {corpus_text}", file=sys.stderr)
        for d_model, layers, ff in sizes:
            size = {"d_model": d_model, "layers": layers, "heads": 4, "ff": ff}
            name = f"{d_model}x{layers}x{ff}"
            t0 = time.perf_counter()
            amp = _trainer(root, tmp / f"amp-{name}", args, amp=True, **size)
            probe_s = time.perf_counter() - t0
            fp32 = _trainer(root, tmp / f"fp32-{name}", args, precision="fp32", **size)
            runs = {"amp": _stepper(amp), "fp32": _stepper(fp32)}
            for run in runs.values():
                run(3)  # warm up: allocator, kernels
            rates = {key: [] for key in runs}
            for r in range(args.rounds):
                for key in (("amp", "fp32") if r % 2 == 0 else ("fp32", "amp")):
                    real, _, dt = runs[key](args.fit_steps)
                    rates[key].append(real / dt)
            probe = amp.precision.probe
            result = {
                "size": name,
                "params": amp.num_params,
                "amp_precision": amp.precision.name,
                "probe_bf16_vs_fp32": probe.ratio if probe else None,
                "probe_noise": probe.noise if probe else None,
                "probe_shapes": [list(s) for s in probe.shapes] if probe else None,
                "trainer_build_with_probe_s": probe_s,
                "amp_real_tokens_per_s": statistics.median(rates["amp"]),
                "fp32_real_tokens_per_s": statistics.median(rates["fp32"]),
            }
            result["amp_vs_fp32"] = result["amp_real_tokens_per_s"] / result["fp32_real_tokens_per_s"]
            results.append(result)
            print(f"{name}: {amp.precision.reason}", file=sys.stderr, flush=True)
    print(f"{'size DxLxFF':<13} {'params':>8} {'--amp chose':>11} {'probe bf16/fp32':>15} {'build s':>7} "
          f"{'fp32 tok/s':>10} {'amp tok/s':>10} {'amp/fp32':>8}")
    for r in results:
        probed = f"{r['probe_bf16_vs_fp32']:.2f}x" if r["probe_bf16_vs_fp32"] is not None else "n/a"
        print(f"{r['size']:<13} {r['params'] / 1e6:>7.2f}M {r['amp_precision']:>11} {probed:>15} "
              f"{r['trainer_build_with_probe_s']:>7.1f} {r['fp32_real_tokens_per_s']:>10.0f} "
              f"{r['amp_real_tokens_per_s']:>10.0f} {r['amp_vs_fp32']:>7.2f}x")
    print("goal: amp/fp32 >= 1.00x for every size")
    print(json.dumps({"amp_check": results, "corpus": corpus_text, "batch_tokens": args.batch_tokens,
                      "rounds": args.rounds, "fit_steps": args.fit_steps, "threads": torch.get_num_threads()}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="dataset folder (default: generate the heavy-tailed corpus)")
    p.add_argument("--corpus", choices=KINDS, default="auto", help="real instruction data, synthetic, or auto (real if possible)")
    p.add_argument("--real-mb", type=float, default=40, help="size of the real corpus as JSON [MB]")
    p.add_argument("--sequences", type=int, default=20000, help="synthetic corpus size [sequences]")
    p.add_argument("--dim", type=int, default=28)
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per batch (default 1024; 4096 with --amp)")
    p.add_argument("--num-workers", type=int, default=0, help="loader workers of the fit pipeline (fit's CPU default)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--fit-steps", type=int, default=40)
    p.add_argument("--seed-steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--amp", action="store_true", help="compare fit --amp with fp32 at --sizes instead")
    p.add_argument("--sizes", default="64x2x256,128x4x512,256x4x1024", help="--amp: model sizes d_model x layers x ff")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.amp:
        return amp_check(args)
    args.batch_tokens = args.batch_tokens or 1024

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = Path(args.data) if args.data else tmp / "corpus"
        corpus_text = f"dataset {root}"
        if not args.data:
            t0 = time.perf_counter()
            corpus_text = build_dataset(root, args.corpus, num_sequences=args.sequences, real_mb=args.real_mb, dim=args.dim)
            print(f"corpus: {corpus_text} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        lengths = np.asarray(load_lengths(read_index(root)))

        trainer = _trainer(root, tmp / "run", args, d_model=D_MODEL, layers=LAYERS, heads=HEADS, ff=FF)
        run_fit = _stepper(trainer)
        seed = SeedPipeline(root, batch_size=16, max_len=args.batch_tokens, seed=0)

        def run_seed(n):
            real = 0
            t0 = time.perf_counter()
            for _ in range(n):
                r, _ = seed.step()
                real += r
            return real, time.perf_counter() - t0

        run_fit(5)  # warm up: allocator, kernels, loader workers
        run_seed(1)
        peak_tflops = []
        fit_rates, fit_mfu, seed_rates = [], [], []
        for _ in range(args.rounds):
            peak_tflops.append(measure_matmul_peak_tflops())
            real, flops, dt = run_fit(args.fit_steps)
            fit_rates.append(real / dt)
            fit_mfu.append(flops / dt / (peak_tflops[-1] * 1e12))
            real, dt = run_seed(args.seed_steps)
            seed_rates.append(real / dt)

    seed_params = sum(p.numel() for p in seed.model.parameters())
    result = {
        "fit_real_tokens_per_s": statistics.median(fit_rates),
        "seed_real_tokens_per_s": statistics.median(seed_rates),
        "speedup": statistics.median(fit_rates) / statistics.median(seed_rates),
        "fit_mfu": statistics.median(fit_mfu),
        "matmul_peak_tflops": statistics.median(peak_tflops),
        "fit_params": trainer.num_params,
        "seed_params": seed_params,
        "corpus": corpus_text,
        "sequences": int(len(lengths)),
        "median_length": float(np.median(lengths)),
        "p99_length": float(np.percentile(lengths, 99)),
        "batch_tokens": args.batch_tokens,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
    }
    print(f"{'pipeline':<8} {'real tok/s (median)':>20} {'MFU':>6}")
    print(f"{'fit':<8} {result['fit_real_tokens_per_s']:>20.0f} {100 * result['fit_mfu']:>5.1f}%")
    print(f"{'seed':<8} {result['seed_real_tokens_per_s']:>20.0f} {'':>6}")
    print(f"speedup {result['speedup']:.1f}x | fp32 matmul peak {result['matmul_peak_tflops']:.3f} TFLOP/s | "
          f"lengths median {result['median_length']:.0f}, p99 {result['p99_length']:.0f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
