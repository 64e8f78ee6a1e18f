"""VGG16 (Simonyan & Zisserman 2015, configuration "D", no BatchNorm) in plain torch.

State-dict keys match torchvision's ``vgg16`` (``features.{0,2,5,7,10,12,14,17,19,21,24,26,28}``,
``classifier.{0,3,6}``), so ``vgg16-397923af.pth`` loads with ``strict=True``.
The adaptive average pool to 7x7 is the identity at the native 224x224 input; the legacy ONNX
exporter only supports it when the map size is a multiple of 7, so export at 224.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _make_features(cfg: list) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(cin, v, kernel_size=3, padding=1), nn.ReLU()]
            cin = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, cfg: list = CFG_D, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = _make_features(cfg)
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (7, 7))
        return self.classifier(torch.flatten(x, 1))


def vgg16(num_classes: int = 1000) -> VGG:
    return VGG(CFG_D, num_classes)
