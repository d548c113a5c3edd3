"""Training throughput of `streamtrain fit` beside the seed pipeline, and an ablation that measures each of
fit's effects alone in the same run, so the ratio between the two is explained, not just claimed.

    seed         random batches of 16 padded to the longest (pad_sequence), nn.TransformerEncoder with a
                 causal and a key-padding mask, plain (per-parameter loop) AdamW
    +bucketing   the seed with length-bucketed token-budget batches from ShardStream instead
    +sdpa        the seed with fit's model (pre-LN blocks, scaled_dot_product_attention(is_causal), no mask)
    +fused adamw the seed with fused AdamW (foreach where fused is unavailable)
    all three    the three together, outside the Trainer
    fit          the Trainer of `streamtrain fit` (its loader, standardization, step, clipping, schedule)

Every pipeline trains the same model size on the same data; after a warm-up, rounds alternate between
them (the order rotated), each running steps for a time budget; rates are medians over rounds. MFU is
PaLM-style model FLOPs on real tokens over the matmul peak measured in this run.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from streamtrain.data import ShardStream, make_loader
from streamtrain.data.batch import Standardizer
from streamtrain.dataset import open_shard, read_index
from streamtrain.model.config import ModelConfig
from streamtrain.model.transformer import CausalTransformer, sinusoidal_positions
from streamtrain.telemetry import measure_matmul_peak_tflops
from streamtrain.train.loss import masked_sq_error, valid_target_count

__all__ = ["ModelShape", "SeedModel", "Variant", "VARIANTS", "AblationPipeline", "FitPipeline", "load_sequences", "measure_train"]


@dataclass(frozen=True)
class ModelShape:
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    ff: int = 512

    @classmethod
    def parse(cls, text: str) -> "ModelShape":
        """'DxLxFF' (4 heads, fewer when d_model is small) or 'DxLxFFxH'."""
        from streamtrain.errors import UserError

        try:
            parts = [int(v) for v in text.lower().split("x")]
        except ValueError:
            parts = []
        if len(parts) not in (3, 4) or min(parts) < 1:
            raise UserError(f"--model: expected D x L x FF[x H] such as 128x4x512, got {text!r}")
        heads = parts[3] if len(parts) == 4 else next(h for h in (4, 2, 1) if parts[0] % h == 0)
        if parts[0] % heads:
            raise UserError(f"--model: d_model {parts[0]} is not divisible by {heads} heads")
        return cls(parts[0], parts[1], heads, parts[2])

    def text(self) -> str:
        return f"{self.d_model}x{self.layers}x{self.ff}x{self.heads}"


class SeedModel(nn.Module):
    """The seed pipeline's model: the same widths as fit's, PyTorch's stock encoder layers."""

    def __init__(self, dim: int, shape: ModelShape):
        super().__init__()
        self.d_model = shape.d_model
        self.embed = nn.Linear(dim, shape.d_model)
        layer = nn.TransformerEncoderLayer(shape.d_model, shape.heads, shape.ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, shape.layers, enable_nested_tensor=False)
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, dim)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        h = self.embed(x) + sinusoidal_positions(T, self.d_model, device=x.device)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # True: may not attend
        h = self.encoder(h, mask=causal, src_key_padding_mask=pad_mask, is_causal=True)
        return self.head(self.ln_f(h))


@dataclass(frozen=True)
class Variant:
    name: str
    batches: str  # 'random' (16 sequences, padded to the longest) | 'bucketed' (ShardStream)
    model: str  # 'encoder' (nn.TransformerEncoder + masks) | 'sdpa' (fit's model)
    optimizer: str  # 'plain' (for-loop AdamW) | 'fused'
    what: str


VARIANTS = (
    Variant("seed", "random", "encoder", "plain", "random batches of 16, TransformerEncoder + masks, plain AdamW"),
    Variant("bucketing", "bucketed", "encoder", "plain", "the seed with length-bucketed token-budget batches"),
    Variant("sdpa", "random", "sdpa", "plain", "the seed with fit's SDPA model (is_causal, no mask)"),
    Variant("fused_adamw", "random", "encoder", "fused", "the seed with fused AdamW"),
    Variant("all_three", "bucketed", "sdpa", "fused", "bucketing + SDPA + fused AdamW, outside the Trainer"),
)


def load_sequences(root: Path, max_len: int) -> list[torch.Tensor]:
    """Every sequence of the dataset as a tensor (the seed holds the corpus in memory), cut at `max_len`."""
    index = read_index(root)
    sequences = []
    for shard in index.shards:
        for chunk in open_shard(root / shard.file).column("sequence").chunks:
            offsets = chunk.offsets.to_numpy()
            values = chunk.values.flatten().to_numpy().reshape(-1, index.dim)
            for start, end in zip(offsets[:-1], offsets[1:]):
                sequences.append(torch.from_numpy(values[start : min(end, start + max_len)].copy()))
    return sequences


class AblationPipeline:
    """One training step at a time of `variant`; step() -> (real tokens, model FLOPs) of the step."""

    def __init__(self, variant: Variant, root: Path, sequences: list[torch.Tensor], shape: ModelShape,
                 batch_tokens: int, device: torch.device, seed: int = 0):
        index = read_index(root)
        self.variant, self.device, self.dim = variant, device, index.dim
        self.standardize = Standardizer(index.mean, index.std, device)
        self.sequences = sequences
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.flops_model = CausalTransformer(ModelConfig(dim=index.dim, d_model=shape.d_model, layers=shape.layers,
                                                         heads=shape.heads, ff=shape.ff))
        self.model = (SeedModel(index.dim, shape) if variant.model == "encoder" else self.flops_model).to(device)
        params = list(self.model.parameters())
        kwargs = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}
        if variant.optimizer == "plain":
            self.optimizer = torch.optim.AdamW(params, foreach=False, **kwargs)
        else:
            try:
                self.optimizer = torch.optim.AdamW(params, fused=True, **kwargs)
            except (RuntimeError, ValueError):
                self.optimizer = torch.optim.AdamW(params, foreach=True, **kwargs)
        self.bucketed = self._bucketed(root, batch_tokens) if variant.batches == "bucketed" else None

    @staticmethod
    def _bucketed(root: Path, batch_tokens: int):
        stream = ShardStream(root, max_tokens=batch_tokens, seed=0)
        epoch = 0
        while True:
            stream.set_epoch(epoch)
            for batch in make_loader(stream, num_workers=0):
                yield batch.x, batch.mask, batch.lengths
            epoch += 1

    def _random_batch(self):
        picks = self.rng.integers(0, len(self.sequences), size=16)
        members = [self.sequences[i] for i in picks]
        lengths = torch.tensor([len(s) for s in members])
        x = nn.utils.rnn.pad_sequence(members, batch_first=True)  # (B, T_max, D)
        return x, torch.arange(x.shape[1])[None, :] < lengths[:, None], lengths

    def step(self) -> tuple[int, float]:
        x, mask, lengths = next(self.bucketed) if self.bucketed is not None else self._random_batch()
        x, mask = x.to(self.device), mask.to(self.device)
        x_std = self.standardize(x, mask)
        pred = self.model(x_std, ~mask) if self.variant.model == "encoder" else self.model(x_std)
        loss = masked_sq_error(pred, x_std, mask) / valid_target_count(lengths, self.dim)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return int(lengths.sum()), self.flops_model.train_flops(lengths)


class FitPipeline:
    """The Trainer of `streamtrain fit`, built as the command builds it, stepped one optimizer step at a time."""

    def __init__(self, root: Path, run_dir: Path, shape: ModelShape, batch_tokens: int, device: torch.device,
                 precision: str = "fp32"):
        from streamtrain.train.config import resolve_config
        from streamtrain.train.dataprep import prepare_data
        from streamtrain.train.feed import step_groups
        from streamtrain.train.trainer import Trainer

        flags = {"data": str(root), "out": str(run_dir), "batch_tokens": batch_tokens, "num_workers": 0,
                 "max_steps": 10**9, "quiet": True, "lr": 1e-3, "precision": precision,
                 **dataclasses.asdict(shape)}
        cfg = resolve_config(flags)
        data = prepare_data(cfg, run_dir, is_main=True)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dim=data.index.dim))
        self.trainer = Trainer(cfg, data, run_dir, device)
        self.dim = data.index.dim
        self.groups = step_groups(self.trainer.loader, cfg.train.grad_accum, None)
        self.step_no = 0

    def step(self) -> tuple[int, float]:
        t = self.trainer
        _, group, _ = next(self.groups)
        target_count = sum(valid_target_count(b.lengths, self.dim) for b in group)
        t.runner.run(group, target_count, t.schedule.lr(self.step_no))
        self.step_no += 1
        return sum(int(b.lengths.sum()) for b in group), sum(t.model.train_flops(b.lengths) for b in group)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(pipeline, budget_s: float, device: torch.device) -> tuple[int, float, float]:
    """Steps of `pipeline` until `budget_s` has passed (at least one): (real tokens, FLOPs, seconds)."""
    real, flops = 0, 0.0
    _sync(device)
    t0 = time.perf_counter()
    while True:
        r, f = pipeline.step()
        real, flops = real + r, flops + f
        if time.perf_counter() - t0 >= budget_s:
            break
    _sync(device)
    return real, flops, time.perf_counter() - t0


def gemm_shape_tflops(shape: ModelShape, dim: int, tokens: int, device: torch.device, budget_s: float) -> float:
    """TFLOP/s of the model's dense matmuls alone, forward and backward (input and weight gradients), at
    fit's shapes: `tokens` rows through every Linear of the model (embedding, qkv, attention output, the two
    feed-forward layers per block, head). No attention, norms, activations or optimizer: a ceiling for the
    MFU any pipeline of this model reaches with these kernels at this batch size."""
    d, ff = shape.d_model, shape.ff
    shapes = [(dim, d)] + [(d, 3 * d), (d, d), (d, ff), (ff, d)] * shape.layers + [(d, dim)]
    gen = torch.Generator(device=device).manual_seed(0)
    layers = [nn.Linear(a, b).to(device) for a, b in shapes]
    inputs = [torch.randn(tokens, a, generator=gen, device=device).requires_grad_() for a, _ in shapes]
    grads = [torch.randn(tokens, b, generator=gen, device=device) for _, b in shapes]
    flops = sum(6.0 * tokens * a * b for a, b in shapes)

    def run() -> None:
        for layer, x, g in zip(layers, inputs, grads):
            layer(x).backward(g)

    for _ in range(3):
        run()
    rates = []
    deadline = time.perf_counter() + budget_s
    while time.perf_counter() < deadline or len(rates) < 3:
        _sync(device)
        t0 = time.perf_counter()
        run()
        _sync(device)
        rates.append(flops / (time.perf_counter() - t0) / 1e12)
    return statistics.median(rates)


def measure_train(root: Path, work: Path, *, shape: ModelShape, batch_tokens: int, device: torch.device,
                  rounds: int, budget_s: float, warmup_steps: int = 2, peak_budget_s: float = 0.2,
                  ablation: bool = True) -> dict:
    sequences = load_sequences(root, batch_tokens)
    variants = VARIANTS if ablation else VARIANTS[:1]
    pipelines = {v.name: AblationPipeline(v, root, sequences, shape, batch_tokens, device) for v in variants}
    fit = FitPipeline(root, work / "fit-run", shape, batch_tokens, device)
    pipelines["fit"] = fit
    for p in pipelines.values():  # warm up: allocator, kernels, the loader's first plan
        for _ in range(warmup_steps):
            p.step()
    names = list(pipelines)
    rates: dict[str, list[float]] = {n: [] for n in names}
    fit_mfu, seed_mfu, gemm_mfu, fp32_peaks, bf16_peaks = [], [], [], [], []
    dim = read_index(root).dim
    for r in range(rounds):
        fp32_peaks.append(measure_matmul_peak_tflops(budget_s=peak_budget_s, device=device))
        bf16_peaks.append(measure_matmul_peak_tflops(budget_s=peak_budget_s, dtype=torch.bfloat16, device=device))
        gemm_mfu.append(gemm_shape_tflops(shape, dim, batch_tokens, device, peak_budget_s) / fp32_peaks[-1])
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            real, flops, dt = _timed_steps(pipelines[name], budget_s, device)
            rates[name].append(real / dt)
            if name == "fit":
                fit_mfu.append(flops / dt / (fp32_peaks[-1] * 1e12))
            elif name == "seed":
                seed_mfu.append(flops / dt / (fp32_peaks[-1] * 1e12))
    med = {n: statistics.median(v) for n, v in rates.items()}
    seed = med["seed"]
    table = [{"name": v.name, "what": v.what, "real_tokens_per_s": med[v.name], "vs_seed": med[v.name] / seed}
             for v in variants]
    table.append({"name": "fit", "what": "the Trainer of streamtrain fit", "real_tokens_per_s": med["fit"],
                  "vs_seed": med["fit"] / seed})
    figures = {
        "train_real_tokens_per_s": med["fit"],
        "seed_train_real_tokens_per_s": seed,
        "train_vs_seed": med["fit"] / seed,
        "mfu": statistics.median(fit_mfu),
        # The limits: the seed's MFU (model FLOPs on its real tokens) makes 1 / seed_mfu the ratio fit would
        # reach at 100% MFU; the model's matmuls alone at fit's batch size bound the MFU these kernels allow.
        "seed_mfu": statistics.median(seed_mfu),
        "train_vs_seed_ceiling": 1.0 / statistics.median(seed_mfu),
        "gemm_shape_mfu": statistics.median(gemm_mfu),
        "train_precision": fit.trainer.precision.name,
        "fp32_matmul_peak_tflops": statistics.median(fp32_peaks),
        "bf16_matmul_peak_tflops": statistics.median(bf16_peaks),
        "train_model": shape.text(),
        "train_params": fit.trainer.num_params,
        "train_batch_tokens": batch_tokens,
        "train_rounds": rounds,
        "train_budget_s": budget_s,
        "torch_threads": torch.get_num_threads(),
        "ablation": table,
    }
    if ablation:
        figures["fit_vs_all_three"] = med["fit"] / med["all_three"]
        for v in variants[1:]:
            figures[f"ablation_{v.name}_vs_seed"] = med[v.name] / seed
    return figures
