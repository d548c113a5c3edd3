"""Export a trained model for serving without streamtrain: `torch.export` (a .pt2 file that
`torch.export.load` reads) or ONNX (with the onnx package), with a dynamic batch size and sequence length,
checked against the eager model.

The exported module takes vectors in original units, float32 (B, T, D), right-padded, positions from 0, and
returns the next-vector predictions in original units (B, T, D): the checkpoint's standardization is inside
it, and class groups (`--categorical`) come out as probabilities. Padding needs no mask: under the causal
mask a real position never sees a pad.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from streamtrain.errors import UserError

__all__ = ["ServingModel", "export_checkpoint", "FORMATS"]

FORMATS = {".pt2": "torch.export", ".onnx": "onnx"}


class ServingModel(torch.nn.Module):
    """The trained model between its standardization and the un-standardization of its outputs."""

    def __init__(self, model, standardizer):
        super().__init__()
        self.model = model
        self.register_buffer("mean", standardizer.mean64.float().cpu().clone())
        self.register_buffer("inv_std", (1.0 / standardizer.std64).float().cpu().clone())
        self.register_buffer("std", standardizer.std64.float().cpu().clone())
        self.groups = list(model.cfg.categorical_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = self.model((x - self.mean) * self.inv_std)  # (B, T, D) standardized
        out = pred * self.std + self.mean
        if not self.groups:
            return out
        parts, at = [], 0
        for a, b in self.groups:
            parts += [out[..., at:a], torch.softmax(pred[..., a:b], dim=-1)]
            at = b
        parts.append(out[..., at:])
        return torch.cat(parts, dim=-1)


def _check_batches(data_dir, config, standardizer, max_batches: int, verify: bool) -> list[torch.Tensor]:
    """Inputs to compare on: the first batches of `data_dir` (original units), or without it, vectors drawn
    around the training statistics at a few lengths up to the training context."""
    from streamtrain.eval.evaluate import eval_context

    max_len, _ = eval_context(config.to_json(), 16)
    if data_dir is not None:
        from streamtrain.eval.predict import open_model_data

        data = open_model_data(config, data_dir, verify=verify)
        out = []
        for batch in data.loader:
            out.append(batch.x)
            if len(out) == max_batches:
                break
        return out
    gen = torch.Generator().manual_seed(0)
    mean, std = standardizer.mean64.float().cpu(), standardizer.std64.float().cpu()
    return [torch.randn(B, T, config.model.dim, generator=gen) * std + mean
            for B, T in ((1, 2), (3, max(2, max_len // 2)), (2, max_len))]


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, data_dir=None, ema: bool = False,
                      max_batches: int = 4, verify: bool = True) -> dict:
    """Export `checkpoint` to `out` (.pt2: torch.export; .onnx: ONNX, needs the onnx package), atomically,
    then run the exported program and the eager model on the same inputs (`_check_batches`). Returns
    {"format", "out", "max_abs_diff", "num_batches", "inputs"}; max_abs_diff is None for an ONNX file when
    onnxruntime, which runs it, is not installed."""
    from streamtrain.dataset import atomic_write_with, naming_full_disk
    from streamtrain.eval.load import load_model

    out = Path(out)
    kind = FORMATS.get(out.suffix.lower())
    if kind is None:
        raise UserError(f"--out {out}: the file name must end in .pt2 (torch.export) or .onnx")
    if kind == "onnx" and importlib.util.find_spec("onnx") is None:
        raise UserError(f"--out {out}: exporting to ONNX needs the onnx package (pip install onnx onnxscript); "
                        ".pt2 (torch.export) needs nothing more")
    model, standardizer, config = load_model(checkpoint, "cpu", ema=ema)
    serving = ServingModel(model, standardizer).eval()
    batches = _check_batches(data_dir, config, standardizer, max_batches, verify)
    example = batches[-1]
    B, T = torch.export.Dim("batch", min=1), torch.export.Dim("time", min=2)
    dynamic = {"x": {0: B, 1: T}}
    with torch.no_grad():
        program = torch.export.export(serving, (example,), dynamic_shapes=dynamic)
    with naming_full_disk(out):
        if kind == "torch.export":
            atomic_write_with(out, lambda f: torch.export.save(program, f))
            run = torch.export.load(str(out)).module()
        else:
            run = _export_onnx(serving, example, dynamic, out)
    diff = None if run is None else 0.0
    with torch.no_grad():
        for x in batches if run is not None else ():
            diff = max(diff, float((run(x) - serving(x)).abs().max()))
    return {"format": kind, "out": str(out), "max_abs_diff": diff, "num_batches": len(batches),
            "inputs": f"batches of {data_dir}" if data_dir is not None else "batches of random vectors"}


def _export_onnx(serving, example, dynamic, out: Path):
    """ONNX through torch.onnx's exporter (dynamo); the check runs it with onnxruntime when installed."""
    from streamtrain.dataset import atomic_write_bytes

    program = torch.onnx.export(serving, (example,), dynamo=True, dynamic_shapes=dynamic, input_names=["x"])
    import io

    buf = io.BytesIO()
    program.save(buf)
    atomic_write_bytes(out, buf.getvalue())
    if importlib.util.find_spec("onnxruntime") is None:
        return None  # written; checking it needs onnxruntime
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out))
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
