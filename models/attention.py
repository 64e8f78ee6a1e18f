"""CBAM and BAM attention modules in plain torch.

Parameter names follow the official code of Park, Woo et al. (github.com/Jongchan/attention-module,
``MODELS/cbam.py`` and ``MODELS/bam.py``), so the released ResNet50+CBAM / ResNet50+BAM ImageNet
checkpoints load with ``strict=True`` (after stripping DataParallel's ``module.`` prefix):

* CBAM (inside every bottleneck, attribute ``cbam``)::

    cbam.ChannelGate.mlp.1.{weight,bias}       Linear(C, C // 16)     (mlp.0 is a Flatten)
    cbam.ChannelGate.mlp.3.{weight,bias}       Linear(C // 16, C)
    cbam.SpatialGate.spatial.conv.weight       Conv2d(2, 1, 7, padding=3, bias=False)
    cbam.SpatialGate.spatial.bn.*              BatchNorm2d(1)

* BAM (after layer1..3, attributes ``bam1..bam3``)::

    channel_att.gate_c.gate_c_fc_0.*           Linear(C, C // 16)
    channel_att.gate_c.gate_c_bn_1.*           BatchNorm1d(C // 16)
    channel_att.gate_c.gate_c_fc_final.*       Linear(C // 16, C)
    spatial_att.gate_s.gate_s_conv_reduce0.*   Conv2d(C, C // 16, 1)
    spatial_att.gate_s.gate_s_bn_reduce0.*     BatchNorm2d(C // 16)
    spatial_att.gate_s.gate_s_conv_di_{0,1}.*  Conv2d(C // 16, C // 16, 3, padding=4, dilation=4)
    spatial_att.gate_s.gate_s_bn_di_{0,1}.*    BatchNorm2d(C // 16)
    spatial_att.gate_s.gate_s_conv_final.*     Conv2d(C // 16, 1, 1)

For the ONNX engine every gate is written as an element-wise ``Mul`` of the data tensor by a
``Sigmoid`` output (broadcast over the missing axes, no Expand): CBAM's channel gate is
``x * sigmoid(a[:, :, None, None])`` (the Sigmoid feeds the Mul directly), its spatial gate
``x * sigmoid(s)`` with ``s`` of shape (N, 1, H, W), and BAM is ``x * (1 + sigmoid(c * s))`` with
``c`` (N, C, 1, 1) and ``s`` (N, 1, H, W), exactly as in the original.
Global pooling uses ``adaptive_{avg,max}_pool2d(·, 1)`` (identical to the original's
full-size ``avg_pool2d``/``max_pool2d`` for any input size), and the channel-wise max/mean of the
spatial gate use ``amax``/``mean`` (ReduceMax / ReduceMean in ONNX).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Flatten(nn.Module):
    """Parameter-free flatten kept as a module so that ``Sequential`` indices match the original."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


# ------------------------------------------------------------------------------------------- CBAM
class BasicConv(nn.Module):
    """conv (+ BN) (+ ReLU); CBAM's spatial gate uses it with BN and without ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: int = 0, bn: bool = True, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=1, padding=padding, bias=False)
        # eps / momentum as in the original (momentum only matters for training).
        self.bn = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.01) if bn else None
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.relu is not None:
            x = self.relu(x)
        return x


class CBAMChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        self.mlp = nn.Sequential(Flatten(), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        # (N, C) -> (N, C, 1, 1) before the sigmoid so that the Sigmoid output feeds the Mul directly.
        return x * torch.sigmoid(att.unsqueeze(2).unsqueeze(3))


class CBAMSpatialGate(nn.Module):
    def __init__(self, kernel: int = 7):
        super().__init__()
        self.spatial = BasicConv(2, 1, kernel, padding=(kernel - 1) // 2, bn=True, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ChannelPool of the original: [max over channels, mean over channels].
        pooled = torch.cat([torch.amax(x, dim=1, keepdim=True), torch.mean(x, dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., ECCV 2018): channel gate then spatial gate."""

    def __init__(self, channels: int, reduction: int = 16, no_spatial: bool = False):
        super().__init__()
        self.ChannelGate = CBAMChannelGate(channels, reduction)
        self.SpatialGate = None if no_spatial else CBAMSpatialGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ChannelGate(x)
        if self.SpatialGate is not None:
            x = self.SpatialGate(x)
        return x


# -------------------------------------------------------------------------------------------- BAM
class BAMChannelGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, num_layers: int = 1):
        super().__init__()
        dims = [channels] + [channels // reduction] * num_layers + [channels]
        self.gate_c = nn.Sequential()
        self.gate_c.add_module("flatten", Flatten())
        for i in range(len(dims) - 2):
            self.gate_c.add_module(f"gate_c_fc_{i}", nn.Linear(dims[i], dims[i + 1]))
            self.gate_c.add_module(f"gate_c_bn_{i + 1}", nn.BatchNorm1d(dims[i + 1]))
            self.gate_c.add_module(f"gate_c_relu_{i + 1}", nn.ReLU())
        self.gate_c.add_module("gate_c_fc_final", nn.Linear(dims[-2], dims[-1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, 1, 1) channel logits."""
        return self.gate_c(F.adaptive_avg_pool2d(x, 1)).unsqueeze(2).unsqueeze(3)


class BAMSpatialGate(nn.Module):
    def __init__(self, channels: int, reduction: int = 16, dilation_conv_num: int = 2, dilation: int = 4):
        super().__init__()
        mid = channels // reduction
        self.gate_s = nn.Sequential()
        self.gate_s.add_module("gate_s_conv_reduce0", nn.Conv2d(channels, mid, kernel_size=1))
        self.gate_s.add_module("gate_s_bn_reduce0", nn.BatchNorm2d(mid))
        self.gate_s.add_module("gate_s_relu_reduce0", nn.ReLU())
        for i in range(dilation_conv_num):
            self.gate_s.add_module(f"gate_s_conv_di_{i}",
                                   nn.Conv2d(mid, mid, kernel_size=3, padding=dilation, dilation=dilation))
            self.gate_s.add_module(f"gate_s_bn_di_{i}", nn.BatchNorm2d(mid))
            self.gate_s.add_module(f"gate_s_relu_di_{i}", nn.ReLU())
        self.gate_s.add_module("gate_s_conv_final", nn.Conv2d(mid, 1, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1, H, W) spatial logits."""
        return self.gate_s(x)


class BAM(nn.Module):
    """Bottleneck Attention Module (Park et al., BMVC 2018): ``x * (1 + sigmoid(Mc(x) * Ms(x)))``."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel_att = BAMChannelGate(channels, reduction)
        self.spatial_att = BAMSpatialGate(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + torch.sigmoid(self.channel_att(x) * self.spatial_att(x)))
