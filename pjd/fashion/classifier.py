"""The Fashion-MNIST classifier behind pjd's quality measures (FID features and class accuracy).

A small CNN on 28×28 grayscale images (pixels ``x / 255``)::

    conv3x3 1→32, ReLU, maxpool2 → conv3x3 32→64, ReLU, maxpool2 → flatten 3136
    → linear 3136→128, ReLU  (the 128 "features": FID is computed on these)
    → dropout → linear 128→10 (logits)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_DIM = 128


class FashionClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 7 * 7, FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(FEATURE_DIM, 10)

    @staticmethod
    def to_input(images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, 28, 28]`` -> float ``[N, 1, 28, 28]`` in [0, 1]."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 3 or tuple(images.shape[1:]) != (28, 28):
            raise ValueError(f"images: expected uint8 [N, 28, 28], got {images.dtype} {tuple(images.shape)}")
        return images.float()[:, None] / 255

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))
