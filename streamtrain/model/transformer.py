"""The causal Transformer that predicts the next vector of a sequence, and its FLOPs-per-token count.

Shapes: B batch, T time (padded length), D input width (`dim`, e.g. 28), C model width (`d_model`),
H heads, hd = C // H head width.

    x (B, T, D) --Linear--> (B, T, C) + sinusoidal positions --> L pre-LN blocks --> LayerNorm --> Linear --> (B, T, D)

Output position t is the prediction of the input vector at t + 1. A `KVCache` keeps each block's keys and
values, so that a rollout feeds one new position per step instead of re-running the whole sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from streamtrain.model.config import ModelConfig

__all__ = ["CausalTransformer", "KVCache", "sinusoidal_positions"]


def sinusoidal_positions(T: int, C: int, device=None, dtype=torch.float32, start: int = 0) -> torch.Tensor:
    """(T, C) fixed positional encoding of "Attention Is All You Need" (sin on even, cos on odd channels)
    of positions start, ..., start + T - 1."""
    pos = start + torch.arange(T, device=device, dtype=torch.float32)  # (T,)
    return _sinusoid(pos, C).to(dtype)


def _sinusoid(pos: torch.Tensor, C: int) -> torch.Tensor:
    """float32 positions (...,) -> (..., C) encodings."""
    inv_freq = torch.exp(torch.arange(0, C, 2, device=pos.device, dtype=torch.float32) * (-math.log(10000.0) / C))
    angles = pos[..., None] * inv_freq  # (..., ceil(C/2))
    pe = torch.zeros(*pos.shape, C, device=pos.device, dtype=torch.float32)
    pe[..., 0::2] = torch.sin(angles)
    pe[..., 1::2] = torch.cos(angles[..., : C // 2])
    return pe


class KVCache:
    """Keys and values of every block for a batch, in slots 0..length-1 of a preallocated buffer.

    Attention has no relative-position term (positions enter once, added to the embedding), so a slot need not
    be a position: a right-padded prefix fills slots 0..Tp-1, and every later step of every row appends at the
    same slot, while `valid` (B, slots) hides the prefix's padding from every later query."""

    def __init__(self, batch: int, slots: int, cfg: ModelConfig, device, dtype=torch.float32):
        hd = cfg.d_model // cfg.heads
        shape = (batch, cfg.heads, slots, hd)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.layers)]
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)
        self.length = 0  # slots filled

    def attention_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, length + T) True where query t of the T new slots may attend: every valid earlier slot,
        and the new slots up to itself."""
        start = self.length
        end = start + T
        slot = torch.arange(end, device=self.valid.device)
        causal = slot[None, :] <= (start + torch.arange(T, device=self.valid.device))[:, None]  # (T, end)
        return (causal[None] & self.valid[:, None, :end])[:, None]  # (B, 1, T, end)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_head
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd)
        v = v.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, hd)
        if cache is not None:
            start, end = cache.length, cache.length + T
            cache.keys[layer][:, :, start:end] = k
            cache.values[layer][:, :, start:end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]  # (B, H, end, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
            return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))
        # No padding mask is needed: sequences are right-padded, so every key a real position t may attend
        # to under the causal mask (positions <= t) is itself real. Pad positions attend to real keys and to
        # other pads, but their outputs are never used as a prediction and never feed a real position.
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.ff)
        self.proj = nn.Linear(cfg.ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C) -> (B, T, ff) -> (B, T, C)


class Block(nn.Module):
    """Pre-LN block (GPT-2): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        x = x + self.mlp(self.ln_2(x))
        return x


class CausalTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.input_norm = nn.LayerNorm(cfg.dim) if cfg.input_norm else nn.Identity()
        self.embed = nn.Linear(cfg.dim, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.dim)
        self.apply(self._init_weights)
        # GPT-2 scaled init of the residual projections: keeps the residual stream's variance flat in depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.layers))
        self._pe_cache: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def _positions(self, T: int, device, dtype) -> torch.Tensor:
        # A handful of bucket lengths occur, so the cache stays small.
        if torch.compiler.is_compiling():
            return sinusoidal_positions(T, self.cfg.d_model, device, dtype)  # constant-folded by the compiler
        key = (T, str(device), dtype)
        pe = self._pe_cache.get(key)
        if pe is None:
            pe = self._pe_cache[key] = sinusoidal_positions(T, self.cfg.d_model, device, dtype)
        return pe

    def forward(self, x: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D) standardized inputs -> (B, T, D) predictions of the next (standardized) vector.

        offsets: (B,) position of each row's first vector within its sequence (a later window of a sequence
        longer than --max-len starts past 0), so row b's vector t is encoded at position offsets[b] + t;
        None: every row starts at 0."""
        return self.head(self.features(x, offsets))  # (B, T, D)

    def features(self, x: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """The final hidden states (after the last LayerNorm) that the head reads: (B, T, D) -> (B, T, C)."""
        B, T, D = x.shape
        h = self.embed(self.input_norm(x))  # (B, T, C)
        if offsets is None:
            pe = self._positions(T, h.device, h.dtype)  # (T, C)
        else:
            pos = offsets.to(h.device, torch.float32)[:, None] + torch.arange(T, device=h.device, dtype=torch.float32)
            pe = _sinusoid(pos, self.cfg.d_model).to(h.dtype)  # (B, T, C)
        h = self.drop(h + pe)  # (B, T, C)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)  # (B, T, C)

    @torch.no_grad()
    def step_cached(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
        """Append T new slots to `cache` and predict from them, in eval mode (no dropout).

        x: (B, T, D) standardized inputs; positions: (B, T) the position of each in its sequence;
        valid: (B, T) which of them are real (default all: padding of a right-padded prefix is not).
        Returns (B, T, D) predictions of the next vector, as `forward` would give at those positions."""
        B, T, D = x.shape
        cache.valid[:, cache.length : cache.length + T] = True if valid is None else valid
        mask = cache.attention_mask(T)  # (B, 1, T, length + T)
        h = self.embed(self.input_norm(x)) + _sinusoid(positions.to(x.device, torch.float32), self.cfg.d_model).to(x.dtype)
        for layer, block in enumerate(self.blocks):
            h = block(h, cache, layer, mask)
        cache.length += T
        return self.head(self.ln_f(h))  # (B, T, D)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context length `seq_len`.

        PaLM (Chowdhery et al. 2022), appendix B: 6 N for the parameter matmuls (2 forward, 4 backward) plus
        12 L C T for the attention scores and the weighted sum of values (QK^T and AV, forward + backward).
        The attention term is PaLM's non-causal convention: it counts the full T x T score matrix although the
        causal mask makes half of it unnecessary; nanoGPT's estimate_mfu counts the same way, so MFU figures
        are comparable with it (and overstate the work a causal kernel must do)."""
        c = self.cfg
        return 6.0 * self.num_params() + 12.0 * c.layers * c.d_model * seq_len

    def train_flops(self, lengths) -> float:
        """Training FLOPs of one pass over rows of these lengths (each attends within itself):
        sum over rows of l * flops_per_token(l) = 6 N sum(l) + 12 L C sum(l^2), same convention."""
        l64 = torch.as_tensor(lengths).to(torch.int64)
        c = self.cfg
        return 6.0 * self.num_params() * int(l64.sum()) + 12.0 * c.layers * c.d_model * int((l64 * l64).sum())
