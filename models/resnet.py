"""ResNet family in plain torch (no torchvision), with the checkpoint key layouts of the originals.

* :class:`ResNet` / :func:`resnet18` / :func:`resnet50`: torchvision layout (``conv1``, ``bn1``,
  ``layer1..4.N.{conv1,bn1,conv2,bn2[,conv3,bn3]}``, ``downsample.0/.1``, ``fc``), ImageNet
  classifier. The forward ends with ``adaptive_avg_pool2d(1) -> flatten -> fc``.
* :func:`resnet50_cbam` / :func:`resnet50_bam`: Jongchan/attention-module (``MODELS/model_resnet.py``,
  ImageNet variant: 7x7 conv1 + bn1 + relu + maxpool). CBAM sits in every bottleneck after ``bn3``
  and before the residual addition (``layerK.N.cbam...``, built with ``planes * 4`` channels), BAM
  after layer1..3 (``bam1..bam3``). The original ends with ``AvgPool2d(7)``, identical to the
  global average pool used here at 224x224. Their checkpoints are ``{'state_dict': ...}`` saved
  from ``DataParallel``: use :func:`convert_checkpoint` (unwraps and strips ``module.``).
* :class:`ResNetNPID` / :func:`resnet18_npid` / :func:`resnet50_npid`: lemniscate.pytorch
  (Wu et al., CVPR 2018, ``models/resnet.py``): torchvision layout whose ``fc`` is
  ``Linear(512 * expansion, 128)`` followed by parameter-free L2 normalisation (their ``Normalize``).
  ``export_raw_embedding=True`` returns the 128-d embedding *before* the L2 normalisation.
  Note: their released ``.pth.tar`` also pickles the ``lemniscate`` memory object, which
  ``torch.load(weights_only=True)`` refuses; extract ``checkpoint['state_dict']`` once (with
  ``weights_only=False`` on a trusted file) and save it as a plain state dict.
* :class:`ResNet50MS` / :func:`resnet50_ms`: msight-tech/research-ms-loss (Wang et al., CVPR 2019):
  ``Sequential(backbone=ResNet50 wrapper holding a torchvision resnet50 in .model, head=LinearNorm)``.
  Keys ``backbone.model.*`` (including the unused ImageNet ``backbone.model.fc``, which the original
  keeps in its state dict) and ``head.fc.{weight,bias}`` (``Linear(2048, 512)``, no BN); the head
  L2-normalises. Checkpoints are ``{'model': state_dict, 'optimizer': ..., 'scheduler': ...}``.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .attention import BAM, CBAM


# ----------------------------------------------------------------------------------- checkpoints
def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Remove ``prefix`` (DataParallel's ``module.`` by default) from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return strip_prefix(state_dict, "module.")


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "model_sd", "net", "params")


def unwrap_checkpoint(obj) -> dict[str, torch.Tensor]:
    """Return the state dict inside a training checkpoint (``{'state_dict': ...}``, ``{'model': ...}``, ...)."""
    while isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        else:
            raise ValueError(f"cannot find a state dict in checkpoint with keys {sorted(obj)[:10]}")
    return dict(obj)


def convert_checkpoint(obj) -> dict[str, torch.Tensor]:
    """Unwrap a training checkpoint and strip DataParallel's ``module.`` prefix."""
    return strip_module_prefix(unwrap_checkpoint(obj))


# ---------------------------------------------------------------------------------------- blocks
def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 use_cbam: bool = False):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.cbam = CBAM(planes, 16) if use_cbam else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck (stride on the 3x3 conv), as in all the originals used here."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 use_cbam: bool = False):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.cbam = CBAM(planes * self.expansion, 16) if use_cbam else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.cbam is not None:
            out = self.cbam(out)
        return self.relu(out + identity)


# ----------------------------------------------------------------------------------------- trunk
class ResNet(nn.Module):
    """ImageNet ResNet. ``att_type`` is None, ``"CBAM"`` or ``"BAM"`` (Jongchan/attention-module)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 att_type: str | None = None):
        super().__init__()
        if att_type not in (None, "CBAM", "BAM"):
            raise ValueError(f"att_type must be None, 'CBAM' or 'BAM', got {att_type!r}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        use_cbam = att_type == "CBAM"
        if att_type == "BAM":
            self.bam1 = BAM(64 * block.expansion)
            self.bam2 = BAM(128 * block.expansion)
            self.bam3 = BAM(256 * block.expansion)
        else:
            self.bam1 = self.bam2 = self.bam3 = None
        self.layer1 = self._make_layer(block, 64, layers[0], 1, use_cbam)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, use_cbam)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, use_cbam)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, use_cbam)
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights()

    def _make_layer(self, block, planes: int, blocks: int, stride: int, use_cbam: bool) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, use_cbam=use_cbam)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, use_cbam=use_cbam) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        if self.bam1 is not None:
            x = self.bam1(x)
        x = self.layer2(x)
        if self.bam2 is not None:
            x = self.bam2(x)
        x = self.layer3(x)
        if self.bam3 is not None:
            x = self.bam3(x)
        return self.layer4(x)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(self.forward_features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """lemniscate's ``Normalize(2)``: ``x / ||x||_2`` along dim 1 (no epsilon, as in the original)."""
    return x / x.pow(2).sum(1, keepdim=True).sqrt()


class ResNetNPID(ResNet):
    """Non-parametric instance discrimination ResNet: ``fc`` projects to ``low_dim`` (128) then L2-norm."""

    def __init__(self, block, layers: list[int], low_dim: int = 128, export_raw_embedding: bool = False):
        super().__init__(block, layers, num_classes=low_dim)
        self.export_raw_embedding = export_raw_embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.fc(self.pooled(x))
        return emb if self.export_raw_embedding else l2_normalize(emb)


class _MSBackbone(nn.Module):
    """research-ms-loss ``ResNet50`` backbone: a torchvision resnet50 in ``.model`` whose fc is unused."""

    def __init__(self):
        super().__init__()
        self.model = ResNet(Bottleneck, [3, 4, 6, 3], num_classes=1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.pooled(x)


class _LinearNormHead(nn.Module):
    def __init__(self, in_features: int = 2048, dim: int = 512):
        super().__init__()
        self.fc = nn.Linear(in_features, dim)


class ResNet50MS(nn.Module):
    """ResNet50 + linear embedding head trained with the Multi-Similarity loss."""

    def __init__(self, dim: int = 512, export_raw_embedding: bool = False):
        super().__init__()
        self.backbone = _MSBackbone()
        self.head = _LinearNormHead(2048, dim)
        self.export_raw_embedding = export_raw_embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.head.fc(self.backbone(x))
        return emb if self.export_raw_embedding else F.normalize(emb, p=2, dim=1)


# ------------------------------------------------------------------------------------- factories
def resnet18(num_classes: int = 1000) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet50_cbam(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, att_type="CBAM")


def resnet50_bam(num_classes: int = 1000) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, att_type="BAM")


def resnet18_npid(low_dim: int = 128, export_raw_embedding: bool = False) -> ResNetNPID:
    return ResNetNPID(BasicBlock, [2, 2, 2, 2], low_dim, export_raw_embedding)


def resnet50_npid(low_dim: int = 128, export_raw_embedding: bool = False) -> ResNetNPID:
    return ResNetNPID(Bottleneck, [3, 4, 6, 3], low_dim, export_raw_embedding)


def resnet50_ms(dim: int = 512, export_raw_embedding: bool = False) -> ResNet50MS:
    return ResNet50MS(dim, export_raw_embedding)
