"""DINO-style projection head used by ToCo's class token contrast (toco.md §1.3).

MLP in_dim → hidden → hidden → bottleneck (GELU between, trunc-normal(0.02) weights,
zero biases), L2-normalise, then a bias-free weight-normalised linear layer
bottleneck → out_dim whose weight-norm gain is fixed to 1. With the gain fixed,
the last layer is just "each output unit is the cosine-like projection onto a unit
row", so it is written here as a linear layer whose rows are normalised at every
forward; that is the same function as `nn.utils.weight_norm` with `weight_g = 1`
frozen, without the deprecated hook. The teacher copy is an `engine.ema.EMA` of it.
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class ProjectionHead(nn.Module):
    """Class-token projection: (N, in_dim) → (N, out_dim), defaults as ToCo's (768 → 1024)."""

    def __init__(self, in_dim: int = 768, out_dim: int = 1024, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(num_layers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        # The reference's last layer keeps nn.Linear's default init (it is created after
        # the trunc-normal pass); only its direction matters since rows are normalised.
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), p=2, dim=-1)
        return F.linear(x, F.normalize(self.last_layer.weight, p=2, dim=1))
