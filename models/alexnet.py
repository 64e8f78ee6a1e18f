"""AlexNet (Krizhevsky 2012, torchvision's single-tower variant) in plain torch.

State-dict keys match torchvision's ``alexnet`` (``features.{0,3,6,8,10}``,
``classifier.{1,4,6}``), so ``alexnet-owt-7be5be79.pth`` loads with ``strict=True``.
The adaptive average pool to 6x6 is the identity at the native 224x224 input (the feature map is
already 6x6); the legacy ONNX exporter only supports it when the map size is a multiple of 6,
so export at 224 (or e.g. 448).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class AlexNet(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (6, 6))
        return self.classifier(torch.flatten(x, 1))


def alexnet(num_classes: int = 1000) -> AlexNet:
    return AlexNet(num_classes)
