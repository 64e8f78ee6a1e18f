"""Plain-torch re-implementations of the TOPOLOGY of 25 CNN families (issue 13), at small widths
and depths so that each exports and analyses in seconds.

No timm, no torchvision: each family keeps the block structure that matters to the graph
(branches, concatenations, fan-outs, gates, norms, activations, heads) as timm 1.0.29 writes it
(read from its source: ``timm/models/<family>.py``), with channel counts divided down and stage
depths cut to what still shows every block kind (a first block that changes shape, and a block
whose input fans out to an identity shortcut). Each net has ``features(x)``: the last spatial
feature map before the head (timm's ``forward_features``), and ``forward(x) = head(features(x))``.

    build(name) -> an eval-mode net with random weights and BatchNorm statistics calibrated on
                   random inputs (so folded BN is not the identity and activations stay O(1))
    FAMILIES[name].size -> its input side (64 for most; larger where the stem needs it)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 10


# ------------------------------------------------------------------------------ building blocks
def conv_bn(cin: int, cout: int, k: int = 3, s: int = 1, g: int = 1, act=nn.ReLU, pad: int | None = None,
            eps: float = 1e-5) -> nn.Sequential:
    """timm's ConvNormAct: Conv (no bias) -> BatchNorm -> activation (None: no activation)."""
    layers = [nn.Conv2d(cin, cout, k, s, k // 2 if pad is None else pad, groups=g, bias=False),
              nn.BatchNorm2d(cout, eps=eps)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def bn_act_conv(cin: int, cout: int, k: int = 1, s: int = 1, g: int = 1) -> nn.Sequential:
    """Pre-activation unit (DenseNet, DPN): BatchNorm -> ReLU -> Conv."""
    return nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False))


class SqueezeExcite(nn.Module):
    """timm's SEModule / SqueezeExcite: mean pool -> 1x1 conv -> act -> 1x1 conv -> gate -> x * gate.
    ``norm``: a BatchNorm in the reduce path (ReXNet's SEWithNorm)."""

    def __init__(self, c: int, rd: int, act=nn.ReLU, gate=nn.Sigmoid, norm: bool = False):
        super().__init__()
        self.fc1 = nn.Conv2d(c, rd, 1)
        self.bn = nn.BatchNorm2d(rd) if norm else nn.Identity()
        self.act = act()
        self.fc2 = nn.Conv2d(rd, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.bn(self.fc1(s)))))


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> Linear (timm's ClassifierHead)."""

    def __init__(self, c: int):
        super().__init__()
        self.fc = nn.Linear(c, NUM_CLASSES)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvHead(nn.Module):
    """Pool -> 1x1 Conv -> act -> flatten -> Linear (MobileNetV3 / LCNet / GhostNet's conv_head);
    with ``fc=False``, pool -> 1x1 Conv classifier -> flatten (DPN, DLA)."""

    def __init__(self, c: int, hidden: int, act=nn.Hardswish, fc: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(c, hidden if fc else NUM_CLASSES, 1)
        self.act = act() if fc else nn.Identity()
        self.fc = nn.Linear(hidden, NUM_CLASSES) if fc else nn.Identity()

    def forward(self, x):
        x = self.act(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return self.fc(x.flatten(1))


class Net(nn.Module):
    """``stem`` -> ``body`` = features; ``head`` on top."""

    def features(self, x):
        return self.body(self.stem(x))

    def forward(self, x):
        return self.head(self.features(x))


# ---------------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bn_size: int):
        super().__init__()
        self.unit1 = bn_act_conv(cin, bn_size * growth, 1)
        self.unit2 = bn_act_conv(bn_size * growth, growth, 3)

    def forward(self, xs: list):
        return self.unit2(self.unit1(torch.cat(xs, 1)))


class DenseBlock(nn.Module):
    def __init__(self, n: int, cin: int, growth: int, bn_size: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(DenseLayer(cin + i * growth, growth, bn_size) for i in range(n))

    def forward(self, x):
        feats = [x]
        for layer in self.layers:
            feats.append(layer(feats))
        return torch.cat(feats, 1)


class DenseNet(Net):
    """densenet121: stem, dense blocks of concatenating layers, BN-ReLU-1x1-AvgPool transitions, norm5."""

    def __init__(self, growth: int = 8, blocks=(2, 3, 2, 2), stem: int = 16):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem, 7, 2), nn.MaxPool2d(3, 2, 1))
        layers, c = [], stem
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(n, c, growth))
            c += n * growth
            if i < len(blocks) - 1:
                layers += [bn_act_conv(c, c // 2, 1), nn.AvgPool2d(2, 2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]          # norm5 (BatchNormAct2d)
        self.body = nn.Sequential(*layers)
        self.head = ClassifierHead(c)


# ------------------------------------------------------------------------------- Inception-v3
def bconv(cin, cout, k=1, s=1, pad=0):
    """Inception's BasicConv2d: Conv -> BN(eps 1e-3) -> ReLU; ``k``/``pad`` may be pairs."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, pad, bias=False), nn.BatchNorm2d(cout, eps=1e-3), nn.ReLU())


class InceptionA(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.b1 = bconv(cin, 8)
        self.b5 = nn.Sequential(bconv(cin, 6), bconv(6, 8, 5, pad=2))
        self.b3 = nn.Sequential(bconv(cin, 8), bconv(8, 12, 3, pad=1), bconv(12, 12, 3, pad=1))
        self.bp = bconv(cin, pool)
        self.out = 28 + pool

    def forward(self, x):
        return torch.cat([self.b1(x), self.b5(x), self.b3(x), self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.b3 = bconv(cin, 24, 3, 2)
        self.bd = nn.Sequential(bconv(cin, 8), bconv(8, 12, 3, pad=1), bconv(12, 12, 3, 2))
        self.out = 36 + cin

    def forward(self, x):
        return torch.cat([self.b3(x), self.bd(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.b1 = bconv(cin, 16)
        self.b7 = nn.Sequential(bconv(cin, c7), bconv(c7, c7, (1, 7), pad=(0, 3)), bconv(c7, 16, (7, 1), pad=(3, 0)))
        self.bd = nn.Sequential(bconv(cin, c7), bconv(c7, c7, (7, 1), pad=(3, 0)), bconv(c7, c7, (1, 7), pad=(0, 3)),
                                bconv(c7, c7, (7, 1), pad=(3, 0)), bconv(c7, 16, (1, 7), pad=(0, 3)))
        self.bp = bconv(cin, 16)
        self.out = 64

    def forward(self, x):
        return torch.cat([self.b1(x), self.b7(x), self.bd(x), self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.b3 = nn.Sequential(bconv(cin, 16), bconv(16, 20, 3, 2))
        self.b7 = nn.Sequential(bconv(cin, 16), bconv(16, 16, (1, 7), pad=(0, 3)), bconv(16, 16, (7, 1), pad=(3, 0)),
                                bconv(16, 16, 3, 2))
        self.out = 36 + cin

    def forward(self, x):
        return torch.cat([self.b3(x), self.b7(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    """The 3x3 branches split into a 1x3 and a 3x1 conv on one tensor (a fan-out), concatenated."""

    def __init__(self, cin):
        super().__init__()
        self.b1 = bconv(cin, 16)
        self.b3_1 = bconv(cin, 16)
        self.b3_2a, self.b3_2b = bconv(16, 16, (1, 3), pad=(0, 1)), bconv(16, 16, (3, 1), pad=(1, 0))
        self.bd_1 = nn.Sequential(bconv(cin, 20), bconv(20, 16, 3, pad=1))
        self.bd_3a, self.bd_3b = bconv(16, 16, (1, 3), pad=(0, 1)), bconv(16, 16, (3, 1), pad=(1, 0))
        self.bp = bconv(cin, 8)
        self.out = 16 + 32 + 32 + 8

    def forward(self, x):
        b3 = self.b3_1(x)
        b3 = torch.cat([self.b3_2a(b3), self.b3_2b(b3)], 1)
        bd = self.bd_1(x)
        bd = torch.cat([self.bd_3a(bd), self.bd_3b(bd)], 1)
        return torch.cat([self.b1(x), b3, bd, self.bp(F.avg_pool2d(x, 3, 1, 1))], 1)


class InceptionV3(Net):
    """inception_v3 (valid-padded stem, two max pools; Mixed 5b, 6a, 6b, 7a, 7b, 7c). Input 128
    (the stem and the two valid reductions need it to keep 2x2 at the end)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(bconv(3, 8, 3, 2), bconv(8, 8, 3), bconv(8, 16, 3, pad=1), nn.MaxPool2d(3, 2),
                                  bconv(16, 16), bconv(16, 24, 3), nn.MaxPool2d(3, 2))
        a = InceptionA(24, 8)
        b = InceptionB(a.out)
        c = InceptionC(b.out, 8)
        d = InceptionD(c.out)
        e1 = InceptionE(d.out)
        e2 = InceptionE(e1.out)
        self.body = nn.Sequential(a, b, c, d, e1, e2)
        self.head = ClassifierHead(e2.out)


# ---------------------------------------------------------------------------------- GhostNet
class GhostModule(nn.Module):
    """primary 1x1 conv; cheap depthwise conv on its output; concat; slice to ``cout``."""

    def __init__(self, cin, cout, relu=True):
        super().__init__()
        self.cout = cout
        init = math.ceil(cout / 2)
        act = nn.ReLU if relu else None
        self.primary = conv_bn(cin, init, 1, act=act)
        self.cheap = conv_bn(init, init, 3, g=init, act=act)

    def forward(self, x):
        x1 = self.primary(x)
        return torch.cat([x1, self.cheap(x1)], 1)[:, :self.cout]


class GhostBottleneck(nn.Module):
    def __init__(self, cin, mid, cout, k=3, s=1, se=False):
        super().__init__()
        self.ghost1 = GhostModule(cin, mid, relu=True)
        self.dw = conv_bn(mid, mid, k, s, g=mid, act=None) if s > 1 else nn.Identity()
        self.se = SqueezeExcite(mid, max(4, mid // 4), gate=nn.Hardsigmoid) if se else nn.Identity()
        self.ghost2 = GhostModule(mid, cout, relu=False)
        self.short = nn.Identity() if cin == cout and s == 1 else nn.Sequential(
            conv_bn(cin, cin, k, s, g=cin, act=None), conv_bn(cin, cout, 1, act=None))

    def forward(self, x):
        return self.ghost2(self.se(self.dw(self.ghost1(x)))) + self.short(x)


class GhostNet(Net):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.body = nn.Sequential(
            GhostBottleneck(8, 8, 8), GhostBottleneck(8, 24, 12, s=2), GhostBottleneck(12, 36, 12),
            GhostBottleneck(12, 36, 20, 5, 2, se=True), GhostBottleneck(20, 60, 20, 5, se=True),
            GhostBottleneck(20, 60, 40, 3, 2), GhostBottleneck(40, 120, 40, 5, 2, se=True),
            conv_bn(40, 64, 1))
        self.head = ConvHead(64, 128, act=nn.ReLU)


# ------------------------------------------------------------------------------------ DLA-34
class DlaBasic(nn.Module):
    def __init__(self, cin, cout, s=1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, s)
        self.conv2 = conv_bn(cout, cout, 3, act=None)

    def forward(self, x, shortcut=None):
        return F.relu(self.conv2(self.conv1(x)) + (x if shortcut is None else shortcut))


class DlaRoot(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = conv_bn(cin, cout, 1, act=None)

    def forward(self, xs):
        return F.relu(self.conv(torch.cat(xs, 1)))


class DlaTree(nn.Module):
    """timm's DlaTree: recursive trees whose roots concatenate children (and the level root)."""

    def __init__(self, levels, cin, cout, s=1, level_root=False, root_dim=0):
        super().__init__()
        root_dim = root_dim or 2 * cout
        if level_root:
            root_dim += cin
        self.down = nn.MaxPool2d(s, s) if s > 1 else nn.Identity()
        self.project = nn.Identity()
        if levels == 1:
            self.tree1, self.tree2 = DlaBasic(cin, cout, s), DlaBasic(cout, cout)
            if cin != cout:
                self.project = conv_bn(cin, cout, 1, act=None)
            self.root = DlaRoot(root_dim, cout)
        else:
            self.tree1 = DlaTree(levels - 1, cin, cout, s, root_dim=0)
            self.tree2 = DlaTree(levels - 1, cout, cout, root_dim=root_dim + cout)
            self.root = None
        self.level_root = level_root

    def forward(self, x, shortcut=None, children=None):
        children = [] if children is None else children
        bottom = self.down(x)
        shortcut = self.project(bottom)
        if self.level_root:
            children.append(bottom)
        x1 = self.tree1(x, shortcut)
        if self.root is not None:
            return self.root([self.tree2(x1), x1] + children)
        children.append(x1)
        return self.tree2(x1, None, children)


class DLA(Net):
    """dla34: levels (1, 1, 1, 2, 2, 1); head = pool then a 1x1 Conv classifier (use_conv)."""

    def __init__(self, ch=(4, 8, 16, 16, 24, 32)):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, ch[0], 7), conv_bn(ch[0], ch[0], 3), conv_bn(ch[0], ch[1], 3, 2))
        self.body = nn.Sequential(DlaTree(1, ch[1], ch[2], 2), DlaTree(2, ch[2], ch[3], 2, level_root=True),
                                  DlaTree(2, ch[3], ch[4], 2, level_root=True),
                                  DlaTree(1, ch[4], ch[5], 2, level_root=True))
        self.head = ConvHead(ch[5], 0, fc=False)


# ------------------------------------------------------------------------------ HRNet-W18-small
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, s=1):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, s)
        self.conv2 = conv_bn(cout, cout, 3, act=None)
        self.down = nn.Identity() if cin == cout and s == 1 else conv_bn(cin, cout, 1, s, act=None)

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.down(x))


class Bottleneck(nn.Module):
    """ResNet bottleneck; ``groups`` (ResNeXt/RegNet), ``se`` (SE after the last BN, or after the
    3x3 for RegNetY: ``se_mid``), ``avg_down`` (ResNet-D shortcut: AvgPool then 1x1 conv)."""

    def __init__(self, cin, mid, cout, s=1, groups=1, se=False, se_mid=False, avg_down=False):
        super().__init__()
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, s, g=groups)
        self.se_mid = SqueezeExcite(mid, max(2, cin // 4)) if se_mid else nn.Identity()
        self.conv3 = conv_bn(mid, cout, 1, act=None)
        self.se = SqueezeExcite(cout, max(2, cout // 16)) if se else nn.Identity()
        if cin == cout and s == 1:
            self.down = nn.Identity()
        elif avg_down:
            pool = nn.AvgPool2d(2, s, ceil_mode=True, count_include_pad=False) if s > 1 else nn.Identity()
            self.down = nn.Sequential(pool, conv_bn(cin, cout, 1, act=None))
        else:
            self.down = conv_bn(cin, cout, 1, s, act=None)

    def forward(self, x):
        out = self.se(self.conv3(self.se_mid(self.conv2(self.conv1(x)))))
        return F.relu(out + self.down(x))


class HRModule(nn.Module):
    """One BasicBlock per branch, then fuse: upsample (1x1 conv, BN, nearest Upsample) from lower
    resolutions, strided 3x3 convs from higher ones, sum, ReLU."""

    def __init__(self, chs):
        super().__init__()
        n = len(chs)
        self.branches = nn.ModuleList(BasicBlock(c, c) for c in chs)
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j > i:
                    row.append(nn.Sequential(conv_bn(chs[j], chs[i], 1, act=None),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    steps = [conv_bn(chs[j], chs[j], 3, 2) for _ in range(i - j - 1)]
                    row.append(nn.Sequential(*steps, conv_bn(chs[j], chs[i], 3, 2, act=None)))
            self.fuse.append(row)

    def forward(self, xs):
        xs = [b(x) for b, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse):
            y = row[0](xs[0])
            for j in range(1, len(xs)):
                y = y + row[j](xs[j])
            out.append(F.relu(y))
        return out


class HRNet(Net):
    """hrnet_w18_small: stem /4, layer1 bottleneck, transitions adding a branch per stage, fuse
    modules, then the classification head: incre bottlenecks, strided downsamples summed from the
    top branch down, final 1x1 conv (spatial: the final feature map)."""

    def __init__(self, chs=(4, 8, 16, 32)):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 16, 3, 2), conv_bn(16, 16, 3, 2), Bottleneck(16, 8, 32))
        self.trans1 = nn.ModuleList([conv_bn(32, chs[0], 3), conv_bn(32, chs[1], 3, 2)])
        self.stage2 = HRModule(chs[:2])
        self.trans2 = conv_bn(chs[1], chs[2], 3, 2)
        self.stage3 = HRModule(chs[:3])
        self.trans3 = conv_bn(chs[2], chs[3], 3, 2)
        self.stage4 = HRModule(chs)
        inc = [2 * c for c in chs]
        self.incre = nn.ModuleList(Bottleneck(c, c // 2, o) for c, o in zip(chs, inc))
        self.downsamp = nn.ModuleList(conv_bn(inc[i], inc[i + 1], 3, 2) for i in range(3))
        self.final = conv_bn(inc[3], 96, 1)
        self.head = ClassifierHead(96)

    def features(self, x):
        x = self.stem(x)
        xs = self.stage2([t(x) for t in self.trans1])
        xs = self.stage3(xs + [self.trans2(xs[-1])])
        xs = self.stage4(xs + [self.trans3(xs[-1])])
        y = self.incre[0](xs[0])
        for i, d in enumerate(self.downsamp):
            y = self.incre[i + 1](xs[i + 1]) + d(y)
        return self.final(y)


# -------------------------------------------------------------------------------- CSPDarknet-53
def leaky():
    return nn.LeakyReLU(0.01)


class DarkBlock(nn.Module):
    def __init__(self, c, mid):
        super().__init__()
        self.conv1 = conv_bn(c, mid, 1, act=leaky)
        self.conv2 = conv_bn(mid, c, 3, act=leaky)

    def forward(self, x):
        return self.conv2(self.conv1(x)) + x


class CrossStage(nn.Module):
    """conv_down (3x3 s2) -> conv_exp (1x1) -> split in halves -> dark blocks on one half ->
    conv_transition_b -> concat with the other half -> conv_transition."""

    def __init__(self, cin, cout, depth, exp_ratio, bottle_ratio, block_ratio):
        super().__init__()
        self.conv_down = conv_bn(cin, cout, 3, 2, act=leaky)
        self.exp = int(cout * exp_ratio)
        self.conv_exp = conv_bn(cout, self.exp, 1, act=leaky)
        half = self.exp // 2
        bc = int(cout * block_ratio)
        assert bc == half
        self.blocks = nn.Sequential(*[DarkBlock(bc, int(cout * bottle_ratio)) for _ in range(depth)])
        self.conv_transition_b = conv_bn(half, half, 1, act=leaky)
        self.conv_transition = conv_bn(self.exp, cout, 1, act=leaky)

    def forward(self, x):
        x = self.conv_exp(self.conv_down(x))
        xs, xb = x.split(self.exp // 2, dim=1)
        xb = self.conv_transition_b(self.blocks(xb))
        return self.conv_transition(torch.cat([xs, xb], 1))


class CSPDarknet(Net):
    def __init__(self, chs=(8, 16, 16, 32, 32), depth=(1, 2, 1, 2, 1)):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, act=leaky)
        stages, c = [], 8
        for i, (o, d) in enumerate(zip(chs, depth)):
            stages.append(CrossStage(c, o, d, 2.0 if i == 0 else 1.0, 0.5 if i == 0 else 1.0, 1.0 if i == 0 else 0.5))
            c = o
        self.body = nn.Sequential(*stages)
        self.head = ClassifierHead(c)


# ---------------------------------------------------------------------------------- Res2Net-50
class Bottle2neck(nn.Module):
    """1x1 -> split into ``scale`` groups -> hierarchical 3x3 convs (each adds the previous output,
    except in a stage's first block) -> concat with the last split (avg-pooled in a first block)
    -> 1x1 -> + shortcut -> ReLU."""

    def __init__(self, cin, width, cout, s=1, scale=4):
        super().__init__()
        self.width = width
        self.conv1 = conv_bn(cin, width * scale, 1)
        self.is_first = s > 1 or cin != cout
        self.convs = nn.ModuleList(conv_bn(width, width, 3, s) for _ in range(scale - 1))
        self.pool = nn.AvgPool2d(3, s, 1) if self.is_first else None
        self.conv3 = conv_bn(width * scale, cout, 1, act=None)
        self.down = conv_bn(cin, cout, 1, s, act=None) if self.is_first else nn.Identity()

    def forward(self, x):
        spx = torch.split(self.conv1(x), self.width, 1)
        spo, sp = [], spx[0]
        for i, conv in enumerate(self.convs):
            sp = spx[i] if i == 0 or self.is_first else sp + spx[i]
            sp = conv(sp)
            spo.append(sp)
        spo.append(self.pool(spx[-1]) if self.pool is not None else spx[-1])
        return F.relu(self.conv3(torch.cat(spo, 1)) + self.down(x))


class Res2Net(Net):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.body = nn.Sequential(Bottle2neck(8, 3, 16), Bottle2neck(16, 3, 16), Bottle2neck(16, 4, 32, 2),
                                  Bottle2neck(32, 6, 48, 2), Bottle2neck(48, 8, 64, 2))
        self.head = ClassifierHead(64)


# ---------------------------------------------------------------------------------- ReXNet-100
class LinearBottleneck(nn.Module):
    """1x1 expand (SiLU) -> depthwise (no act) -> SE with BN -> ReLU6 -> 1x1 linear; the shortcut
    is added to the first ``cin`` channels only: cat([x[:, :cin] + shortcut, x[:, cin:]])."""

    def __init__(self, cin, cout, s, exp, se):
        super().__init__()
        self.cin = cin
        self.use_shortcut = s == 1 and cin <= cout
        dw = cin * exp
        self.conv_exp = conv_bn(cin, dw, 1, act=nn.SiLU) if exp != 1 else nn.Identity()
        self.conv_dw = conv_bn(dw, dw, 3, s, g=dw, act=None)
        self.se = SqueezeExcite(dw, max(2, dw // 12), norm=True) if se else nn.Identity()
        self.act_dw = nn.ReLU6()
        self.conv_pwl = conv_bn(dw, cout, 1, act=None)

    def forward(self, x):
        y = self.conv_pwl(self.act_dw(self.se(self.conv_dw(self.conv_exp(x)))))
        if self.use_shortcut:
            y = torch.cat([y[:, 0:self.cin] + x, y[:, self.cin:]], 1)
        return y


class ReXNet(Net):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2, act=nn.SiLU)
        cfg = [(8, 6, 1, 1, False), (6, 9, 2, 6, False), (9, 12, 1, 6, False), (12, 15, 2, 6, True),
               (15, 18, 1, 6, True), (18, 24, 2, 6, True), (24, 30, 2, 6, True)]
        self.body = nn.Sequential(*[LinearBottleneck(*c) for c in cfg], conv_bn(30, 64, 1, act=nn.SiLU))
        self.head = ClassifierHead(64)


# ------------------------------------------------------------------------------- SelecSLS-42b
class SelecSlsBlock(nn.Module):
    def __init__(self, cin, skip, mid, cout, is_first, s):
        super().__init__()
        self.is_first = is_first
        self.conv1 = conv_bn(cin, mid, 3, s)
        self.conv2 = conv_bn(mid, mid, 1)
        self.conv3 = conv_bn(mid, mid // 2, 3)
        self.conv4 = conv_bn(mid // 2, mid, 1)
        self.conv5 = conv_bn(mid, mid // 2, 3)
        self.conv6 = conv_bn(2 * mid + (0 if is_first else skip), cout, 1)

    def forward(self, xs):
        d1 = self.conv1(xs[0])
        d2 = self.conv3(self.conv2(d1))
        d3 = self.conv5(self.conv4(d2))
        if self.is_first:
            out = self.conv6(torch.cat([d1, d2, d3], 1))
            return [out, out]
        return [self.conv6(torch.cat([d1, d2, d3, xs[1]], 1)), xs[1]]


class SelecSLS(Net):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        cfg = [(8, 0, 8, 8, True, 2), (8, 8, 8, 16, False, 1), (16, 0, 16, 16, True, 2),
               (16, 16, 16, 32, False, 1), (32, 0, 32, 32, True, 2), (32, 32, 32, 48, False, 1)]
        self.blocks = nn.ModuleList(SelecSlsBlock(*c) for c in cfg)
        self.top = nn.Sequential(conv_bn(48, 64, 3, 2), conv_bn(64, 64, 3), conv_bn(64, 96, 3, 2), conv_bn(96, 64, 1))
        self.head = ClassifierHead(64)

    def features(self, x):
        xs = [self.stem(x)]
        for b in self.blocks:
            xs = b(xs)
        return self.top(xs[0])


# ------------------------------------------------------------------------------------ ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: NCHW -> NHWC, layer_norm over channels, -> NCHW."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """7x7 depthwise -> permute to NHWC -> LayerNorm -> Linear -> GELU -> Linear -> permute back
    -> layer scale (gamma) -> + shortcut."""

    def __init__(self, c):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(0.5 + torch.rand(c))

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        return y.mul(self.gamma.reshape(1, -1, 1, 1)) + x


class ConvNeXt(Net):
    def __init__(self, dims=(8, 16, 24, 32), depths=(1, 2, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i:
                stages += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
            stages += [ConvNeXtBlock(d) for _ in range(n)]
        self.body = nn.Sequential(*stages)
        self.head_norm = LayerNorm2d(dims[-1], eps=1e-6)
        self.fc = nn.Linear(dims[-1], NUM_CLASSES)

    def head(self, x):      # NormMlpClassifierHead: pool -> LayerNorm2d -> flatten -> fc
        return self.fc(self.head_norm(F.adaptive_avg_pool2d(x, 1)).flatten(1))


# -------------------------------------------------------------------------------------- DPN-68
class DualPathBlock(nn.Module):
    """Input: a tensor or a (residual, dense) pair (concatenated); a projection (1x1) for the first
    block of a stage, sliced into residual and dense parts; the 1x1/3x3-grouped/1x1 pre-activation
    path sliced the same way; residual parts added, dense parts concatenated."""

    def __init__(self, cin, a, b, c, inc, groups, kind):
        super().__init__()
        self.c = c
        s = 2 if kind == "down" else 1
        self.proj = bn_act_conv(cin, c + 2 * inc, 1, s) if kind in ("proj", "down") else None
        self.c1x1_a = bn_act_conv(cin, a, 1)
        self.c3x3_b = bn_act_conv(a, b, 3, s, groups)
        self.c1x1_c = bn_act_conv(b, c + inc, 1)

    def forward(self, x):
        x_in = torch.cat(x, 1) if isinstance(x, tuple) else x
        if self.proj is not None:
            xs = self.proj(x_in)
            x_s1, x_s2 = xs[:, :self.c], xs[:, self.c:]
        else:
            x_s1, x_s2 = x
        y = self.c1x1_c(self.c3x3_b(self.c1x1_a(x_in)))
        return x_s1 + y[:, :self.c], torch.cat([x_s2, y[:, self.c:]], 1)


class DPN(Net):
    """dpn68: small 3x3 stem; stages conv2..conv5 of dual-path blocks; conv5_bn_ac (cat, BN, ReLU);
    head = global pool then a 1x1 Conv classifier, then flatten."""

    def __init__(self, inc=(4, 4, 4, 8), bw=(16, 24, 32, 48), k_r=8, groups=4):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), nn.MaxPool2d(3, 2, 1))
        blocks, c = [], 8
        for i, (n_inc, w) in enumerate(zip(inc, bw)):
            r = k_r * (i + 1)
            blocks.append(DualPathBlock(c, r, r, w, n_inc, groups, "proj" if i == 0 else "down"))
            c = w + 3 * n_inc
            blocks.append(DualPathBlock(c, r, r, w, n_inc, groups, "normal"))
            c += n_inc
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.head = ConvHead(c, 0, fc=False)

    def features(self, x):
        return F.relu(self.bn(torch.cat(self.blocks(self.stem(x)), 1)))


# ---------------------------------------------------------------- ResNet-50-D, SE-ResNeXt-26d, RegNetY
def deep_stem(c):
    return nn.Sequential(conv_bn(3, c // 2, 3, 2), conv_bn(c // 2, c // 2, 3), conv_bn(c // 2, c, 3), nn.MaxPool2d(3, 2, 1))


class ResNetD(Net):
    """resnet50d (``groups=1, se=False``) and seresnext26d_32x4d (``groups>1, se=True``): deep
    3-conv stem, bottlenecks, average-pool shortcut downsampling."""

    def __init__(self, groups=1, se=False, depths=(2, 1, 1, 1)):
        super().__init__()
        self.stem = deep_stem(16)
        blocks, c = [], 16
        for i, n in enumerate(depths):
            mid, out = 8 * 2 ** i, 16 * 2 ** i
            mid = max(mid, 2 * groups) if groups > 1 else mid
            for j in range(n):
                blocks.append(Bottleneck(c, mid, out, 2 if j == 0 and i > 0 else 1, groups, se=se, avg_down=True))
                c = out
        self.body = nn.Sequential(*blocks)
        self.head = ClassifierHead(c)


class RegNetY(Net):
    """regnety: 3x3 stem, stages of grouped bottlenecks with SE after the 3x3 (rd from the block
    input), 1x1-conv shortcut when the shape changes."""

    def __init__(self, widths=(8, 16, 32, 48), depths=(1, 2, 2, 1), gw=4):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        blocks, c = [], 8
        for w, n in zip(widths, depths):
            for j in range(n):
                blocks.append(Bottleneck(c, w, w, 2 if j == 0 else 1, w // gw, se_mid=True))
                c = w
        self.body = nn.Sequential(*blocks)
        self.head = ClassifierHead(c)


# ------------------------------------------------------------------------------------ VGG-11-BN
class VGG(Net):
    """vgg11_bn: 3x3 Conv-BN-ReLU stacks and five max pools; pre_logits = ConvMlp (a kxk conv
    over the whole final map, ReLU, 1x1 conv, ReLU), then pool and fc. timm's ConvMlp kernel is 7
    for 224 inputs (7x7 final map); here it equals the final map side (2 at 64) for the same role."""

    def __init__(self, cfg=(8, "M", 16, "M", 24, 24, "M", 32, 32, "M", 32, 32, "M"), size=64):
        super().__init__()
        self.stem = nn.Identity()
        layers, c = [], 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(conv_bn(c, v, 3))
                c = v
        self.body = nn.Sequential(*layers)
        k = size // 32
        self.pre_logits = nn.Sequential(nn.Conv2d(c, 64, k), nn.ReLU(), nn.Conv2d(64, 64, 1), nn.ReLU())
        self.head_fc = ClassifierHead(64)

    def head(self, x):
        return self.head_fc(self.pre_logits(x))


# --------------------------------------------------------------------------------------- RepVGG
class RepVggBlock(nn.Module):
    """Training-time RepVGG block: 3x3 conv-BN + 1x1 conv-BN (+ BN of the input when the shape
    is kept), summed, ReLU."""

    def __init__(self, cin, cout, s=1):
        super().__init__()
        self.identity = nn.BatchNorm2d(cin) if cin == cout and s == 1 else None
        self.conv_kxk = conv_bn(cin, cout, 3, s, act=None)
        self.conv_1x1 = conv_bn(cin, cout, 1, s, act=None)

    def forward(self, x):
        y = self.conv_1x1(x) + self.conv_kxk(x)
        if self.identity is not None:
            y = y + self.identity(x)
        return F.relu(y)


class RepVGG(Net):
    def __init__(self, widths=(8, 16, 24, 32), depths=(1, 2, 2, 1)):
        super().__init__()
        self.stem = RepVggBlock(3, 8, 2)
        blocks, c = [], 8
        for w, n in zip(widths, depths):
            for j in range(n):
                blocks.append(RepVggBlock(c, w, 2 if j == 0 else 1))
                c = w
        self.body = nn.Sequential(*blocks)
        self.head = ClassifierHead(c)


# ------------------------------------------------------------------------------------- Xception
def sep_conv(cin, cout):
    """SeparableConv2d: depthwise 3x3 then pointwise 1x1 (no BN between)."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False))


class XceptionBlock(nn.Module):
    def __init__(self, cin, cout, reps, s=1, start_with_relu=True, grow_first=True):
        super().__init__()
        self.skip = conv_bn(cin, cout, 1, s, act=None) if cin != cout or s != 1 else None
        rep, c = [], cin
        for i in range(reps):
            o = cout if (grow_first and i == 0) or (not grow_first and i == reps - 1) else c
            rep += [nn.ReLU(), sep_conv(c, o), nn.BatchNorm2d(o)]
            c = o
        if not start_with_relu:
            rep = rep[1:]
        if s != 1:
            rep.append(nn.MaxPool2d(3, s, 1))
        self.rep = nn.Sequential(*rep)

    def forward(self, x):
        return self.rep(x) + (x if self.skip is None else self.skip(x))


class Xception(Net):
    """legacy_xception: valid 3x3 stem convs; entry blocks (ReLU-SepConv-BN reps, max pool, 1x1
    strided skip); a middle block; exit block (grow last); two SepConv-BN-ReLU."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2, pad=0), conv_bn(8, 16, 3, pad=0))
        self.body = nn.Sequential(
            XceptionBlock(16, 16, 2, 2, start_with_relu=False), XceptionBlock(16, 24, 2, 2),
            XceptionBlock(24, 32, 2, 2), XceptionBlock(32, 32, 3), XceptionBlock(32, 48, 2, 2, grow_first=False),
            sep_conv(48, 64), nn.BatchNorm2d(64), nn.ReLU(), sep_conv(64, 96), nn.BatchNorm2d(96), nn.ReLU())
        self.head = ClassifierHead(96)


# ------------------------------------------------- EfficientNet, MobileNetV3, Lite0, MixNet, LCNet
class Conv2dSame(nn.Conv2d):
    """TF "same" padding (tf_ models): F.pad by the size-dependent amount, then a valid conv."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MixedConv2d(nn.Module):
    """MixNet's mixed kernels: split the channels, a conv of another kernel size on each, concat."""

    def __init__(self, cin, cout, ks, s=1, depthwise=False):
        super().__init__()
        n = len(ks)
        self.splits = [cin // n + (1 if i < cin % n else 0) for i in range(n)]
        outs = self.splits if depthwise else [cout // n + (1 if i < cout % n else 0) for i in range(n)]
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, k // 2, groups=i if depthwise else 1, bias=False)
                                   for i, o, k in zip(self.splits, outs, ks))

    def forward(self, x):
        if len(self.convs) == 1:
            return self.convs[0](x)
        return torch.cat([c(p) for c, p in zip(self.convs, torch.split(x, self.splits, 1))], 1)


def conv_k(cin, cout, k, s=1, g=1, same=False, mixed=None):
    if mixed is not None and len(mixed) > 1:
        return MixedConv2d(cin, cout, mixed, s, depthwise=g > 1)
    if same and s > 1:
        return Conv2dSame(cin, cout, k, s, 0, groups=g, bias=False)
    return nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False)


@dataclass
class MB:
    """One mobile block: ``exp`` 1 = depthwise-separable; ``k`` kernel (tuple: MixNet mixed);
    ``se`` reduce ratio of the block input (0: none); ``act``."""
    cin: int
    cout: int
    k: object = 3
    s: int = 1
    exp: int = 1
    se: float = 0.0
    act: Callable = nn.ReLU
    groups_pw: int = 1     # MixNet's a1.1 / p1.1: expand and project as split 1x1 convs, concatenated


class MBBlock(nn.Module):
    """timm's DepthwiseSeparableConv / InvertedResidual: [1x1 expand-BN-act] -> kxk depthwise-BN-act
    -> [SE] -> 1x1 project-BN [-act for LCNet] -> + shortcut when the shape is kept."""

    def __init__(self, b: MB, gate=nn.Sigmoid, se_act=None, same=False, eps=1e-5, pw_act=False,
                 skip=True):
        super().__init__()
        mid = b.cin * b.exp
        mixed = b.k if isinstance(b.k, tuple) else None
        k = b.k[0] if mixed else b.k
        pw_ks = (1,) * b.groups_pw
        self.expand = nn.Identity() if b.exp == 1 else nn.Sequential(
            conv_k(b.cin, mid, 1, mixed=pw_ks), nn.BatchNorm2d(mid, eps=eps), b.act())
        self.dw = nn.Sequential(conv_k(mid, mid, k, b.s, mid, same, mixed), nn.BatchNorm2d(mid, eps=eps), b.act())
        rd = max(1, int(b.cin * b.se) if b.exp > 1 else int(mid * b.se))
        self.se = SqueezeExcite(mid, rd, se_act or b.act, gate) if b.se else nn.Identity()
        self.pw = nn.Sequential(conv_k(mid, b.cout, 1, mixed=pw_ks), nn.BatchNorm2d(b.cout, eps=eps),
                                *([b.act()] if pw_act else []))
        self.has_skip = skip and b.s == 1 and b.cin == b.cout

    def forward(self, x):
        y = self.pw(self.se(self.dw(self.expand(x))))
        return y + x if self.has_skip else y


class MobileNet(Net):
    """An EfficientNet-style net: stem conv-BN-act, mobile blocks, optional 1x1 conv-BN-act head
    conv (``head_conv``), then ``ConvHead`` (pool, 1x1 conv, act, fc: MobileNetV3, LCNet) or
    ``ClassifierHead`` (EfficientNet, Lite0, MixNet)."""

    def __init__(self, blocks, stem=8, act=nn.ReLU, head_conv=None, conv_head=None, same=False, eps=1e-5,
                 **block_kw):
        super().__init__()
        stem_conv = conv_k(3, stem, 3, 2, same=same)
        self.stem = nn.Sequential(stem_conv, nn.BatchNorm2d(stem, eps=eps), act())
        layers = [MBBlock(b, same=same, eps=eps, **block_kw) for b in blocks]
        c = blocks[-1].cout
        if head_conv:
            layers.append(nn.Sequential(nn.Conv2d(c, head_conv, 1, bias=False), nn.BatchNorm2d(head_conv, eps=eps),
                                        act()))
            c = head_conv
        self.body = nn.Sequential(*layers)
        self.head = ConvHead(c, conv_head, act) if conv_head else ClassifierHead(c)


def efficientnet_b0():
    a = nn.SiLU
    return MobileNet([MB(8, 8, 3, 1, 1, 0.25, a), MB(8, 12, 3, 2, 6, 0.25, a), MB(12, 12, 3, 1, 6, 0.25, a),
                      MB(12, 16, 5, 2, 6, 0.25, a), MB(16, 24, 3, 2, 6, 0.25, a), MB(24, 24, 3, 1, 6, 0.25, a),
                      MB(24, 32, 5, 1, 6, 0.25, a), MB(32, 40, 5, 2, 6, 0.25, a)], act=a, head_conv=64)


def mobilenet_v3():
    r, h = nn.ReLU, nn.Hardswish
    return MobileNet([MB(8, 8, 3, 1, 1, 0, r), MB(8, 12, 3, 2, 4, 0, r), MB(12, 12, 3, 1, 3, 0, r),
                      MB(12, 16, 5, 2, 3, 0.25, r), MB(16, 16, 5, 1, 3, 0.25, r), MB(16, 24, 3, 2, 6, 0, h),
                      MB(24, 24, 3, 1, 3, 0.25, h), MB(24, 32, 5, 2, 6, 0.25, h)],
                     act=h, head_conv=64, conv_head=128, gate=nn.Hardsigmoid, se_act=nn.ReLU)


def tf_efficientnet_lite0(size=64):
    a = nn.ReLU6
    return MobileNet([MB(8, 8, 3, 1, 1, 0, a), MB(8, 12, 3, 2, 6, 0, a), MB(12, 12, 3, 1, 6, 0, a),
                      MB(12, 16, 5, 2, 6, 0, a), MB(16, 24, 3, 2, 6, 0, a), MB(24, 32, 5, 1, 6, 0, a),
                      MB(32, 40, 5, 2, 6, 0, a)], act=a, head_conv=64, same=True, eps=1e-3)


def mixnet():
    """mixnet_s: mixed depthwise kernels (3 to 11, split/concat), split 1x1 expand and project
    (timm's a1.1 / p1.1), SE, ReLU early and Swish later."""
    r, w = nn.ReLU, nn.SiLU
    return MobileNet([MB(8, 8, 3, 1, 1, 0, r), MB(8, 12, 3, 2, 6, 0, r, 2), MB(12, 12, 3, 1, 3, 0, r, 2),
                      MB(12, 16, (3, 5, 7), 2, 6, 0.5, w), MB(16, 16, (3, 5), 1, 6, 0.5, w, 2),
                      MB(16, 24, (3, 5, 7), 2, 6, 0.25, w, 2), MB(24, 24, (3, 5, 7, 9), 1, 3, 0.5, w, 2),
                      MB(24, 32, (3, 5, 7, 9, 11), 2, 6, 0.5, w)], act=r, head_conv=64)


def lcnet():
    h = nn.Hardswish
    return MobileNet([MB(8, 16, 3, 1, 1, 0, h), MB(16, 24, 3, 2, 1, 0, h), MB(24, 24, 3, 1, 1, 0, h),
                      MB(24, 32, 3, 2, 1, 0, h), MB(32, 32, 5, 1, 1, 0, h), MB(32, 48, 5, 2, 1, 0.25, h),
                      MB(48, 64, 5, 2, 1, 0.25, h)],
                     act=h, conv_head=128, gate=nn.Hardsigmoid, se_act=nn.ReLU, pw_act=True, skip=False)


# ------------------------------------------------------------------------------------- NF-ResNet
GAMMA_RELU = 1.7139588594436646     # timm's _nonlin_gamma['relu']


class ScaledStdConv2d(nn.Conv2d):
    """Weight standardisation inside forward: (w - mean) / sqrt(var + eps) * gain / sqrt(fan_in)."""

    def __init__(self, cin, cout, k, s=1, g=1):
        super().__init__(cin, cout, k, s, k // 2, groups=g, bias=True)
        self.gain = nn.Parameter(torch.ones(cout, 1, 1, 1) + 0.1 * torch.randn(cout, 1, 1, 1))
        self.scale = self.weight[0].numel() ** -0.5

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-6) * (self.gain * self.scale)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class GammaAct(nn.Module):
    def forward(self, x):
        return F.relu(x) * GAMMA_RELU


class NormFreeBlock(nn.Module):
    """out = act(x) * beta; shortcut = DownsampleAvg(out) or x; 1x1 -> act -> 3x3 -> act -> 1x1;
    out * alpha + shortcut."""

    def __init__(self, cin, cout, s, beta, alpha=0.2):
        super().__init__()
        mid = cout // 4
        self.beta, self.alpha = beta, alpha
        self.act = GammaAct()
        self.down = None
        if cin != cout or s != 1:
            pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) if s > 1 else nn.Identity()
            self.down = nn.Sequential(pool, ScaledStdConv2d(cin, cout, 1))
        self.conv1 = ScaledStdConv2d(cin, mid, 1)
        self.conv2 = ScaledStdConv2d(mid, mid, 3, s)
        self.conv3 = ScaledStdConv2d(mid, cout, 1)

    def forward(self, x):
        out = self.act(x) * self.beta
        shortcut = x if self.down is None else self.down(out)
        out = self.conv3(self.act(self.conv2(self.act(self.conv1(out)))))
        return out * self.alpha + shortcut


class NFResNet(Net):
    def __init__(self, chs=(16, 32, 48, 64), depths=(2, 1, 1, 1), alpha=0.2):
        super().__init__()
        self.stem = nn.Sequential(ScaledStdConv2d(3, 8, 7, 2), nn.MaxPool2d(3, 2, 1))
        blocks, c, expected = [], 8, 1.0
        for i, (o, n) in enumerate(zip(chs, depths)):
            for j in range(n):
                blocks.append(NormFreeBlock(c, o, 2 if j == 0 and i > 0 else 1, 1.0 / expected, alpha))
                expected = 1.0 if j == 0 else expected   # a transition block resets the variance
                expected = (expected ** 2 + alpha ** 2) ** 0.5
                c = o
        self.body = nn.Sequential(*blocks, GammaAct())      # final_act
        self.head = ClassifierHead(c)


# ------------------------------------------------------------------------------------- ResNetV2
class PreActBottleneck(nn.Module):
    def __init__(self, cin, cout, s=1):
        super().__init__()
        mid = cout // 4
        self.norm1 = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU())
        self.down = nn.Conv2d(cin, cout, 1, s, bias=False) if cin != cout or s != 1 else None
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.norm2 = nn.Sequential(nn.BatchNorm2d(mid), nn.ReLU())
        self.conv2 = nn.Conv2d(mid, mid, 3, s, 1, bias=False)
        self.norm3 = nn.Sequential(nn.BatchNorm2d(mid), nn.ReLU())
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)

    def forward(self, x):
        pre = self.norm1(x)
        shortcut = x if self.down is None else self.down(pre)
        return self.conv3(self.norm3(self.conv2(self.norm2(self.conv1(pre))))) + shortcut


class ResNetV2(Net):
    """resnetv2_50: 7x7 stem + max pool; pre-activation bottlenecks (the shortcut projection
    reads the pre-activated input); final BN + ReLU."""

    def __init__(self, chs=(16, 32, 48, 64), depths=(2, 1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 7, 2, 3, bias=False), nn.MaxPool2d(3, 2, 1))
        blocks, c = [], 8
        for i, (o, n) in enumerate(zip(chs, depths)):
            for j in range(n):
                blocks.append(PreActBottleneck(c, o, 2 if j == 0 and i > 0 else 1))
                c = o
        self.body = nn.Sequential(*blocks, nn.BatchNorm2d(c), nn.ReLU())
        self.head = ClassifierHead(c)


# ---------------------------------------------------------------------------------------- GERNet
class ByobBottle(nn.Module):
    """ByobNet's BottleneckBlock: 1x1 -> kxk (grouped) -> 1x1 (no act) + shortcut -> ReLU."""

    def __init__(self, cin, cout, s, ratio, gs=0):
        super().__init__()
        mid = int(cout * ratio)
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, s, g=mid // gs if gs else 1)
        self.conv3 = conv_bn(mid, cout, 1, act=None)
        self.down = nn.Identity() if cin == cout and s == 1 else conv_bn(cin, cout, 1, s, act=None)

    def forward(self, x):
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + self.down(x))


class GERNet(Net):
    """gernet_s: 3x3 stem; basic-block stages; bottleneck stages (the last two depthwise with
    bottle ratio 3); final 1x1 conv-BN-ReLU (spatial: the final feature map)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2)
        self.body = nn.Sequential(
            BasicBlock(8, 12, 2), BasicBlock(12, 12, 2), BasicBlock(12, 12), ByobBottle(12, 32, 2, 0.25),
            ByobBottle(32, 32, 1, 0.25), ByobBottle(32, 40, 2, 3, gs=1), ByobBottle(40, 40, 1, 3, gs=1),
            conv_bn(40, 96, 1))
        self.head = ClassifierHead(96)


# -------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[], nn.Module]
    size: int = 64


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("densenet121", DenseNet),
    Family("inception_v3", InceptionV3, 128),
    Family("ghostnet", GhostNet),
    Family("dla34", DLA),
    Family("hrnet_w18_small", HRNet),
    Family("cspdarknet53", CSPDarknet),
    Family("res2net50", Res2Net),
    Family("rexnet_100", ReXNet),
    Family("selecsls42b", SelecSLS, 96),
    Family("convnext", ConvNeXt),
    Family("dpn68", DPN),
    Family("resnet50d", ResNetD),
    Family("seresnext26d", lambda: ResNetD(groups=4, se=True, depths=(1, 2, 1, 1))),
    Family("efficientnet_b0", efficientnet_b0),
    Family("mobilenetv3", mobilenet_v3),
    Family("regnety", RegNetY),
    Family("vgg11_bn", VGG),
    Family("repvgg", RepVGG),
    Family("xception", Xception),
    Family("tf_efficientnet_lite0", tf_efficientnet_lite0),
    Family("mixnet", mixnet),
    Family("lcnet", lcnet),
    Family("nf_resnet50", NFResNet),
    Family("resnetv2_50", ResNetV2),
    Family("gernet", GERNet),
]}


def build(name: str, seed: int = 0) -> nn.Module:
    """The family's net, seeded, with BatchNorm running statistics set from random inputs (one
    train-mode pass, cumulative average) and random affine BN parameters; eval mode."""
    fam = FAMILIES[name]
    torch.manual_seed(seed)
    model = fam.make()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.2, 0.2)
    for se in (m for m in model.modules() if isinstance(m, SqueezeExcite)):
        # a positive reduce bias keeps the gate's ReLU mostly alive: a nearly dead 1x1 vector
        # (one entry of 1e-3) makes the per-tensor relative parity error meaningless
        nn.init.uniform_(se.fc1.bias, 0.2, 0.5)
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, fam.size, fam.size))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


# ---------------------------------------------------------------------- export and graph facts
def export_family(name: str, folder, keep_batchnorm: bool = False):
    """(net, ONNX path): the legacy exporter at opset 17 (exporters/torch_export.py, which checks
    onnxruntime parity), "none" preprocessing at the family's size."""
    from pathlib import Path

    from exporters.torch_export import export
    fam = FAMILIES[name]
    model = build(name)
    path = Path(folder) / f"{name}{'_bn' if keep_batchnorm else ''}.onnx"
    export(model, path, (1, 3, fam.size, fam.size), preprocess="none", keep_batchnorm=keep_batchnorm)
    return model, path


def spatial_conv_outputs(path, input_shape=None) -> list[str]:
    """The outputs of Conv nodes on the data path (reached from the image input, and reaching
    the first graph output) whose shape is 4-D with H*W > 1, from the ONNX file alone: the
    graph walked here, the shapes from onnxruntime with every Conv output exposed (no naflow code),
    on zeros of ``input_shape`` (default: the declared input shape, dynamic dims as 1)."""
    import onnx
    import onnxruntime as ort
    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name for i in g.initializer}
    source = next(i for i in g.input if i.name not in inits)
    reach, parents = {source.name}, {}
    for node in g.node:                      # nodes are topologically sorted in a valid model
        ins = [t for t in node.input if t in reach]
        for o in node.output:
            parents[o] = list(node.input)
            if ins:
                reach.add(o)
    needed, stack = set(), [g.output[0].name]
    while stack:
        t = stack.pop()
        if t in needed or t not in reach:
            continue
        needed.add(t)
        stack.extend(parents.get(t, []))
    convs = [n.output[0] for n in g.node if n.op_type == "Conv" and n.output[0] in needed]
    known = {o.name for o in g.output}
    for t in convs:
        if t not in known:
            g.output.add(name=t)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = list(input_shape or [max(d.dim_value, 1) for d in source.type.tensor_type.shape.dim])
    values = dict(zip([o.name for o in sess.get_outputs()],
                      sess.run(None, {source.name: np.zeros(shape, np.float32)})))
    return [t for t in convs if values[t].ndim == 4 and values[t].shape[2] * values[t].shape[3] > 1]


def acceptance(model: nn.Module, path, analyzer, flow) -> dict:
    """Issue 13's acceptance facts for one analysed family (``flow`` from
    ``analyze(..., keep_tensors=True)``): spatial data-path convs and which have a map; the final
    layer, whether it is the last layer, and its relative difference from torch's ``features(x)``
    on the same input; parity; solver convergence of every solved layer."""
    convs = spatial_conv_outputs(path)
    env = flow.tensors.env
    final = flow.final_layer
    with torch.no_grad():
        want = model.features(env[analyzer.graph.input_name].float())
    got = env[final].float()
    same_shape = tuple(got.shape) == tuple(want.shape)
    unconverged = [layer.tensor for layer in flow.layers
                   if layer.solver and not layer.solver.get("converged", True)]
    return {
        "convs": convs, "mapped": [t for t in convs if t in flow.maps],
        "missing": [t for t in convs if t not in flow.maps],
        "final": final, "final_is_last": flow.layers[-1].tensor == final,
        "final_shape": list(got.shape), "features_shape": list(want.shape),
        "final_error": float((got - want).norm() / want.norm()) if same_shape else None,
        "parity": flow.parity["max_relative_error"],
        "solved": flow.solver_summary()["solved"],
        "unsolved": [layer.tensor for layer in flow.layers if not layer.final and layer.solver is None],
        "unconverged": unconverged,
        "nonfinite": [t for t, m in flow.maps.items() if not np.all(np.isfinite(m))],
    }


def verdict(facts: dict, min_coverage: float = 0.9, tol: float = 1e-4) -> list[str]:
    """What fails of issue 13's "done when" for one family (empty: it passes)."""
    bad = []
    n, m = len(facts["convs"]), len(facts["mapped"])
    if m < min_coverage * n:
        bad.append(f"{m}/{n} spatial convs mapped")
    if facts["final_error"] is None or facts["final_error"] > tol or not facts["final_is_last"]:
        bad.append(f"final tensor {facts['final']} {facts['final_shape']} is not features(x) "
                   f"{facts['features_shape']}")
    if facts["parity"] > tol:
        bad.append(f"parity {facts['parity']:.2g}")
    if not facts["solved"]:
        bad.append("no layer solved")
    if facts["unconverged"]:
        bad.append(f"{len(facts['unconverged'])} solves unconverged ({facts['unconverged'][0]}, ...)")
    if facts["unsolved"]:
        bad.append(f"{len(facts['unsolved'])} layers without a solve ({facts['unsolved'][0]}, ...)")
    if facts["nonfinite"]:
        bad.append(f"non-finite maps {facts['nonfinite'][:3]}")
    return bad
