"""Six small CNNs for the synthetic benchmark (plain torch, < 300k parameters each).

All take ``[N, 3, 96, 96]`` float input (see train.PREPROCESS) and return ``[N, 4]`` logits.

* ``plain``    conv-BN-ReLU-MaxPool x 4, conv-BN-ReLU, global average pool, linear.
* ``residual`` stem (conv-BN-ReLU-MaxPool), an identity-shortcut basic block, then three stride-2 basic blocks with
               a stride-2 1x1 conv + BN projection shortcut (ResNet "option B"), GAP, linear.
* ``gated``    the same residual layout with a CBAM-like attention module on each block's
               residual branch before the add: channel gate ``x * sigmoid(mlp(avgpool(x)))``
               then spatial gate ``x * sigmoid(conv7x7([mean_c(x), max_c(x)]))``.
* ``conv4``    the few-shot "Conv4" block layout: 4 x (conv3x3-BN-LeakyReLU(0.2)-MaxPool2),
               GAP, linear (``Conv4(head="flatten")`` flattens the 6x6 map instead, as the
               few-shot embeddings do; it did not reach the accuracy bar, see Conv4).
* ``dense``    DenseNet-style: stem (2 x conv-BN-ReLU-MaxPool2, to 24x24), three dense blocks of three conv3x3-BN-ReLU layers, each
               reading ``cat`` of the block input and all earlier layer outputs (torchvision's
               and timm's layout: every layer output feeds several Concats, a fan-out inside
               the block's segment) at 24, 12 and 6 pixels, each followed by a conv1x1
               transition (and MaxPool2 but after the last), GAP, linear.
* ``inception`` Inception-style (v3 "E" blocks): the same stem, three blocks (24, 12, 6 pixels) where one tensor feeds four
               branches (1x1; 1x1-(1x3 & 3x1); 1x1-3x3-(1x3 & 3x1); MaxPool3x3/1-1x1) joined by
               Concat, the inner 1x3 & 3x1 pairs reading one tensor (a fan-out into two
               convs), MaxPool2 between blocks, GAP over the last 6x6, linear.

In eval mode the TorchScript ONNX exporter folds every BatchNorm into the preceding conv,
so the exported graphs contain Conv/Relu/LeakyRelu/MaxPool/Add/Mul/Sigmoid/ReduceMean/
ReduceMax/Concat/GlobalAveragePool/Flatten/Gemm only (see docs/evaluation.md).
"""
from __future__ import annotations

import torch
from torch import nn

ARCHS = ("plain", "residual", "gated", "conv4", "dense", "inception")
NUM_CLASSES = 4


def _cbr(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class GapNet(nn.Module):
    """``features`` (the given layers), global average pool, linear: the benchmark nets' head.
    Subclasses build their layers first, then call this (the init order fixes the weights)."""

    def __init__(self, layers: list[nn.Module], cin: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class Plain(GapNet):
    def __init__(self, widths=(8, 16, 32, 64), last: int = 96, num_classes: int = NUM_CLASSES):
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += _cbr(cin, w) + [nn.MaxPool2d(2)]
            cin = w
        layers += _cbr(cin, last)
        super().__init__(layers, last, num_classes)


class ChannelGate(nn.Module):
    """``x * sigmoid(W2 relu(W1 avgpool(x)))`` (squeeze-excitation, CBAM's channel half)."""

    def __init__(self, c: int, reduction: int = 4):
        super().__init__()
        hidden = max(c // reduction, 4)
        self.mlp = nn.Sequential(nn.Conv2d(c, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, c, 1))

    def forward(self, x):
        return x * torch.sigmoid(self.mlp(x.mean(dim=(2, 3), keepdim=True)))


class SpatialGate(nn.Module):
    """``x * sigmoid(conv7x7([mean over channels, max over channels]))`` (CBAM's spatial half)."""

    def __init__(self, kernel: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def forward(self, x):
        s = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(s))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, gated: bool = False):
        super().__init__()
        self.body = nn.Sequential(*_cbr(cin, cout, stride),
                                  nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.gate = nn.Sequential(ChannelGate(cout), SpatialGate()) if gated else nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.gate(self.body(x)) + self.shortcut(x))


class Residual(nn.Module):
    def __init__(self, widths=(12, 24, 48, 96), gated: bool = False, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(*_cbr(3, widths[0]), nn.MaxPool2d(2))             # 48x48
        blocks = [BasicBlock(widths[0], widths[0], 1, gated)]                       # identity shortcut
        for cin, cout in zip(widths[:-1], widths[1:]):
            blocks.append(BasicBlock(cin, cout, 2, gated))                          # 24, 12, 6
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class Conv4(nn.Module):
    """4 x (conv3x3-BN-LeakyReLU(0.2)-MaxPool2) + a linear head.

    ``head="gap"`` (the default, used for the benchmark): global average pool + linear.
    ``head="flatten"``: flatten the 6x6 map + linear, like the few-shot Conv4 embeddings.
    Measured: with the flatten head (widths 16-16-32-32) the default recipe reached only
    0.577 train / 0.547 test accuracy after 12 epochs (docs/evaluation.md): a linear layer
    over a 6x6 grid has to learn the class at every position separately. Kept for experiments.
    """

    def __init__(self, widths=(12, 24, 48, 64), size: int = 96, head: str = "gap",
                 num_classes: int = NUM_CLASSES):
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.LeakyReLU(0.2),
                       nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        if head == "gap":
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)
        elif head == "flatten":
            self.pool = nn.Identity()
            side = size // 16
            self.fc = nn.Linear(cin * side * side, num_classes)
        else:
            raise ValueError(f"head must be 'gap' or 'flatten', not {head!r}")

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _stem(widths) -> list[nn.Module]:
    """conv3x3-BN-ReLU-MaxPool2 per width: 96x96 -> 24x24 with two widths (the plain net's start)."""
    layers: list[nn.Module] = []
    cin = 3
    for w in widths:
        layers += _cbr(cin, w) + [nn.MaxPool2d(2)]
        cin = w
    return layers


class DenseBlock(nn.Module):
    """DenseNet's block as torchvision and timm write it: layer i reads ``cat(features)`` (the
    block input and every earlier layer's output) and the block returns ``cat(features)``, so
    each layer's output feeds every later Concat (a fan-out inside the segment). Layers are
    post-activation conv3x3-BN-ReLU so that BN folds into the conv on export."""

    def __init__(self, cin: int, growth: int, layers: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(*_cbr(cin + i * growth, growth)) for i in range(layers))
        self.cout = cin + layers * growth

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(features[0] if len(features) == 1 else torch.cat(features, 1)))
        return torch.cat(features, 1)


class Dense(GapNet):
    def __init__(self, stem=(8, 16), growths=(8, 12, 16), transitions=(32, 48, 64),
                 num_classes: int = NUM_CLASSES):
        layers = _stem(stem)                                                        # 24x24
        cin = stem[-1]
        for growth, width in zip(growths, transitions):                            # 24, 12, 6
            block = DenseBlock(cin, growth)
            layers += [block] + _cbr(block.cout, width, kernel=1)
            layers += [nn.MaxPool2d(2)] if width != transitions[-1] else []
            cin = width
        super().__init__(layers, cin, num_classes)


class SplitConv(nn.Module):
    """Inception-v3's expanded branch end: one tensor into a 1x3 and a 3x1 conv, concatenated."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(cin, cout, (1, 3), 1, (0, 1), bias=False), nn.BatchNorm2d(cout), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(cin, cout, (3, 1), 1, (1, 0), bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class InceptionBlock(nn.Module):
    """Four branches on one input, concatenated (Inception-v3's "E" block, small):
    1x1 | 1x1-(1x3 & 3x1) | 1x1-3x3-(1x3 & 3x1) | MaxPool3x3/1-1x1. The inner (1x3 & 3x1)
    pairs make a tensor with two conv consumers inside the segment (a fan-out)."""

    def __init__(self, cin: int, b1: int, b2: tuple[int, int], b3: tuple[int, int], b4: int):
        super().__init__()
        self.b1 = nn.Sequential(*_cbr(cin, b1, kernel=1))
        self.b2 = nn.Sequential(*_cbr(cin, b2[0], kernel=1), SplitConv(b2[0], b2[1] // 2))
        self.b3 = nn.Sequential(*_cbr(cin, b3[0], kernel=1), *_cbr(b3[0], b3[1]), SplitConv(b3[1], b3[1] // 2))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), *_cbr(cin, b4, kernel=1))
        self.cout = b1 + 2 * (b2[1] // 2) + 2 * (b3[1] // 2) + b4

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class Inception(GapNet):
    def __init__(self, stem=(8, 16), num_classes: int = NUM_CLASSES):
        specs = ((8, (8, 8), (8, 8), 8), (16, (16, 24), (8, 16), 8), (32, (32, 48), (16, 32), 24))
        layers = _stem(stem)                                                        # 24x24
        cin = stem[-1]
        for spec in specs:                                                          # 24, 12, 6
            block = InceptionBlock(cin, *spec)
            layers += [block] + ([nn.MaxPool2d(2)] if spec is not specs[-1] else [])
            cin = block.cout
        super().__init__(layers, cin, num_classes)


def build(arch: str, size: int = 96) -> nn.Module:
    """A freshly initialised network of the named architecture (seed torch beforehand)."""
    if arch == "plain":
        return Plain()
    if arch == "residual":
        return Residual(gated=False)
    if arch == "gated":
        return Residual(gated=True)
    if arch == "conv4":
        return Conv4(size=size)
    if arch == "dense":
        return Dense()
    if arch == "inception":
        return Inception()
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
