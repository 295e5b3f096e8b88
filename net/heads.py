"""Heads of the single-stage methods (AFA, TSCD, ToCo, FSR, TSD-CAM).

`CamHead`: a bias-free 1x1 conv classifier applied after global pooling. Because
it is linear and bias-free, the same weights applied to the un-pooled map give
the CAM (`W . F`), which is how every method of the family reads its CAM; with
max pooling the logit of a class is W . max(F), not max(W . F).

`LargeFOVHead`: ToCo's segmentation decoder (DeepLab-LargeFOV's fc6/fc7/fc8):
3x3 conv dilation 5 (-> 512), ReLU, 3x3 conv dilation 5 (512 -> 512), ReLU,
1x1 conv -> classes, all bias-free, PyTorch default init (ToCo never calls its
init function, toco.md §1.3 and pitfall 14). Padding equals the dilation, so the
output keeps the token grid (stride 16 for a /16 ViT).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class CamHead(nn.Module):
    """Pooled multi-label classifier whose weights also give the CAM.

    forward(features (B, D, h, w)) -> (logits (B, K), cams (B, K, h, w)); the CAMs are
    raw (no ReLU, no normalisation): multi-scale fusion does that later.
    """

    def __init__(self, in_channels: int, num_classes: int, pool: str = "gmp"):
        super().__init__()
        if pool not in ("gmp", "gap"):
            raise ValueError(f"CamHead pool must be 'gmp' (global max) or 'gap' (global average), got {pool!r}")
        self.pool = pool
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=False)

    def cam(self, features: Tensor) -> Tensor:
        """(B, K, h, w) class activation maps W . F."""
        return self.classifier(features)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        if self.pool == "gmp":
            pooled = F.adaptive_max_pool2d(features, 1)
        else:
            pooled = F.adaptive_avg_pool2d(features, 1)
        logits = self.classifier(pooled).flatten(1)
        return logits, self.cam(features)


class LargeFOVHead(nn.Module):
    """ToCo's LargeFOV segmentation head: (B, D, h, w) -> logits (B, classes, h, w)."""

    def __init__(self, in_channels: int, num_classes: int, hidden_channels: int = 512, dilation: int = 5):
        super().__init__()
        self.conv6 = nn.Conv2d(in_channels, hidden_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv7 = nn.Conv2d(hidden_channels, hidden_channels, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv8 = nn.Conv2d(hidden_channels, num_classes, 1, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        x = F.relu(self.conv6(features))
        x = F.relu(self.conv7(x))
        return self.conv8(x)
