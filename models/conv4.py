"""Four-layer few-shot embedding CNNs in plain torch (default input 84x84, output = flattened map).

Conventions chosen (checked against the public originals):

* :class:`Conv4Net` -- few-shot-meta-baseline (github.com/yinboc/few-shot-meta-baseline,
  ``models/convnet4.py``, ``ConvNet4``; the same block as ProtoNet's encoder): 4 blocks of
  ``Conv2d(3x3, padding=1, bias=True) -> BatchNorm2d -> ReLU -> MaxPool2d(2)`` with 64 filters.
  Keys ``encoder.{0..3}.0.{weight,bias}`` (conv) and ``encoder.{0..3}.1.*`` (BN).
  84x84 -> 64x5x5 -> 1600-d embedding (80x80, their mini-ImageNet size, gives the same 1600).
  Preprocessing: ImageNet mean/std (their ``datasets/mini_imagenet.py``).
  Their checkpoints (``{'model_sd': ...}``) store the encoder under ``encoder.`` inside a
  ``classifier`` / ``meta-baseline`` wrapper, i.e. ``encoder.encoder.0.0.weight``:
  :func:`convert_conv4net_checkpoint` keeps only the encoder and strips one ``encoder.``.

* :class:`Conv64F` -- DN4 / CovaMNet family (github.com/WenbinLee/DN4, ``FourLayer_64F`` with
  ``norm='batch'``): ``Conv2d(3x3, padding=1) -> BatchNorm2d -> LeakyReLU(0.2)``, four times,
  with ``MaxPool2d(2)`` after the first two blocks only (84 -> 42 -> 21 -> 21 -> 21): output
  64x21x21 local descriptors, flattened to 28224-d. Keys
  ``features.{0,4,8,11}.weight`` (conv) and ``features.{1,5,9,12}.*`` (BN). In the 2019 DN4
  code the convs have no bias when BatchNorm is used (``use_bias = norm is InstanceNorm``), which
  is the default here (``bias=False``); DN4's newer ``Conv64F_Local`` is the same net *with* conv
  biases (``bias=True``). Preprocessing in DN4: resize to 84x84, mean = std = (0.5, 0.5, 0.5).
"""
from __future__ import annotations

import torch
from torch import nn

from .resnet import strip_module_prefix, unwrap_checkpoint


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))


class Conv4Net(nn.Module):
    def __init__(self, x_dim: int = 3, hid_dim: int = 64, z_dim: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(_conv_block(x_dim, hid_dim), _conv_block(hid_dim, hid_dim),
                                     _conv_block(hid_dim, hid_dim), _conv_block(hid_dim, z_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.encoder(x), 1)


class Conv64F(nn.Module):
    def __init__(self, bias: bool = False, filters: int = 64):
        super().__init__()
        c = filters
        self.features = nn.Sequential(
            nn.Conv2d(3, c, 3, 1, 1, bias=bias), nn.BatchNorm2d(c), nn.LeakyReLU(0.2), nn.MaxPool2d(2, 2),
            nn.Conv2d(c, c, 3, 1, 1, bias=bias), nn.BatchNorm2d(c), nn.LeakyReLU(0.2), nn.MaxPool2d(2, 2),
            nn.Conv2d(c, c, 3, 1, 1, bias=bias), nn.BatchNorm2d(c), nn.LeakyReLU(0.2),
            nn.Conv2d(c, c, 3, 1, 1, bias=bias), nn.BatchNorm2d(c), nn.LeakyReLU(0.2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)


def convert_conv4net_checkpoint(obj) -> dict[str, torch.Tensor]:
    """few-shot-meta-baseline checkpoint (or plain state dict) -> :class:`Conv4Net` state dict."""
    sd = strip_module_prefix(unwrap_checkpoint(obj))
    if any(k.startswith("encoder.encoder.") for k in sd):
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.encoder.")}
    return sd


def convert_conv64f_checkpoint(obj) -> dict[str, torch.Tensor]:
    """DN4 checkpoint (``{'state_dict': ...}``, possibly from DataParallel) -> :class:`Conv64F` state dict."""
    sd = strip_module_prefix(unwrap_checkpoint(obj))
    return {k: v for k, v in sd.items() if k.startswith("features.")}
