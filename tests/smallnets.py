"""Small generated CNNs covering every inverse rule, for the property tests (METHOD.md §8)."""
from __future__ import annotations

import torch
from torch import nn


class Chain(nn.Module):
    """conv-BN-ReLU-MaxPool chain with ReLU6 and LeakyReLU, GAP + linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1), nn.ReLU6(),
            nn.Conv2d(12, 12, 1), nn.LeakyReLU(0.1),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(12, 16, 3, padding=1, groups=4), nn.ReLU())
        self.final = nn.Identity()  # marks the final feature tensor for the torch reference
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.final(self.features(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Block(nn.Module):
    """Residual block: identity shortcut, or a stride-2 1x1 projection shortcut."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class Gate(nn.Module):
    """Sigmoid-gated attention (CBAM-like): channel gate then spatial gate."""

    def __init__(self, c):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(c, c // 2), nn.ReLU(), nn.Linear(c // 2, c))
        self.spatial = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        g = torch.sigmoid(self.mlp(x.mean((2, 3))))[:, :, None, None]
        x = x * g
        s = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.spatial(s))


class ResNetTiny(nn.Module):
    def __init__(self, classes=5, gated=False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = Block(8, 8)
        self.gate = Gate(8) if gated else nn.Identity()
        self.b2 = Block(8, 16, stride=2)
        self.final = nn.Identity()  # marks the final feature tensor for the torch reference
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.final(self.b2(self.gate(self.b1(self.stem(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"chain": Chain, "residual": ResNetTiny,
             "gated": lambda: ResNetTiny(gated=True)}[name]()
    # non-trivial BN statistics so that keeping BN unfolded matters
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


class RedDetector(nn.Module):
    """Channel 0 of every conv follows 'red minus green minus blue' and class 0 reads it: the
    attention of class 0 sits on red objects at every layer. The other channels are random.
    ``stages`` conv-ReLU stages of ``width`` channels with a 2x2 max-pool between them
    (tests/test_check.py uses the default, tests/test_ray.py a smaller one)."""

    def __init__(self, width: int = 8, stages: int = 3):
        super().__init__()
        torch.manual_seed(0)
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
        for _ in range(stages - 1):
            layers += [nn.MaxPool2d(2), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(width, 3)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.mul_(0.3)
                    m.bias.zero_()
            first, *rest = [m for m in self.features if isinstance(m, nn.Conv2d)]
            first.weight[0] = 0
            first.weight[0, :, 1, 1] = torch.tensor([1.0, -1.0, -1.0])
            first.bias[0] = -0.2
            for c in rest:
                c.weight[0] = 0
                c.weight[0, 0, 1, 1] = 2.0
            self.fc.weight[0] = 0
            self.fc.weight[0, 0] = 8.0

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
