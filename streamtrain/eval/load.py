"""`load_model`: a checkpoint written by fit as a ready model, its input standardization and its run config,
the one way every command that uses a trained model loads it."""

from __future__ import annotations

import os

import torch

from streamtrain.errors import UserError

__all__ = ["load_model", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" (CUDA when available, else the CPU), "cpu", "cuda" or a torch.device; CUDA without a device is
    a UserError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device (auto, cpu or cuda)") from None


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "cpu", ema: bool = False):
    """(model, standardizer, config) of a checkpoint: the CausalTransformer with its weights, on `device`, in
    eval mode; the `Standardizer` of its training statistics (`standardizer(x, mask)` gives the model's
    inputs, `mean64`/`std64` undo it); the run's `RunConfig`. `ema`: the exponential moving average of the
    weights that `fit --ema` keeps, instead of the raw ones (a UserError when the run kept none)."""
    from streamtrain.data.batch import Standardizer
    from streamtrain.model.transformer import CausalTransformer
    from streamtrain.train.checkpoint import load_checkpoint
    from streamtrain.train.config import RunConfig

    dev = resolve_device(device)
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    try:
        config = RunConfig.from_json(ckpt["config"], source=f"{checkpoint}: config")
        stats = ckpt["stats"]
        weights = ckpt["model"]
    except KeyError as e:
        raise UserError(f"{checkpoint}: not a streamtrain checkpoint (no {e.args[0]!r})") from None
    if ema:
        if ckpt.get("ema") is None:
            raise UserError(f"{checkpoint}: holds no EMA weights (the run was trained without --ema)")
        weights = ckpt["ema"]
    model = CausalTransformer(config.model)
    model.load_state_dict(weights)
    model.to(dev).eval()
    return model, Standardizer(stats["mean"], stats["std"], dev), config
