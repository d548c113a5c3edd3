"""An exponential moving average of the model's weights (`fit --ema DECAY`), updated after every optimizer
step, evaluated beside the raw weights and saved in every checkpoint (key "ema"), so a resumed run continues
it exactly.

    ema <- decay * ema + (1 - decay) * weights      (fp32, one fused lerp over all parameters)
"""

from __future__ import annotations

import copy

import torch

from streamtrain.train.checkpoint import unwrap_model

__all__ = ["WeightEMA"]


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = float(decay)
        self.model = copy.deepcopy(unwrap_model(model)).eval()  # starts at the weights it is given
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        params = list(unwrap_model(model).parameters())
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in params], 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)
