"""Small models, a few channels wide, each built around one structure that real CNNs use.

Every model takes ``(N, 8, 12, 12)`` images and runs in milliseconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHANNELS = 8
INPUT_SHAPE = (CHANNELS, 12, 12)


def conv_bn(in_channels: int, out_channels: int, kernel_size: int | tuple[int, int] = 3, **kwargs) -> nn.Sequential:
    padding = kwargs.pop("padding", None)
    if padding is None:
        size = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        padding = (size[0] // 2, size[1] // 2)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False, **kwargs),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class Residual(nn.Module):
    """Two basic blocks with identity shortcuts, the first one added to the model input itself."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(conv_bn(CHANNELS, 16), nn.Conv2d(16, CHANNELS, 3, padding=1))
        self.widen = nn.Conv2d(CHANNELS, 16, 1)
        self.block2 = nn.Sequential(conv_bn(16, 16), nn.Conv2d(16, 16, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x + self.block1(x))
        x = self.widen(x)
        return F.relu(x + self.block2(x))


class InceptionConcat(nn.Module):
    """Four branches (1x1, 1x1-3x3, 1x1-5x5, pool-1x1) concatenated along channels, then a 1x1 mix."""

    def __init__(self) -> None:
        super().__init__()
        self.branch1 = conv_bn(CHANNELS, 8, 1)
        self.branch3 = nn.Sequential(conv_bn(CHANNELS, 8, 1), conv_bn(8, 16, 3))
        self.branch5 = nn.Sequential(conv_bn(CHANNELS, 8, 1), conv_bn(8, 8, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn(CHANNELS, 8, 1))
        self.mix = nn.Conv2d(40, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)]
        return self.mix(torch.cat(branches, dim=1))


class DenseConcat(nn.Module):
    """A DenseNet block: each layer's 8 new channels are concatenated to everything before them."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(conv_bn(CHANNELS * (1 + index), 16, 1), nn.Conv2d(16, 8, 3, padding=1))
            for index in range(3))
        self.transition = nn.Conv2d(CHANNELS * 4, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return self.transition(x)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    x = x.view(batch, groups, channels // groups, height, width).transpose(1, 2).contiguous()
    return x.view(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """A ShuffleNet V2 unit: split the channels in two, transform one half, concatenate, shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(CHANNELS, 16, 3)
        self.branch = nn.Sequential(conv_bn(8, 8, 1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                    nn.BatchNorm2d(8), conv_bn(8, 8, 1))
        self.head = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        kept, transformed = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat([kept, self.branch(transformed)], dim=1), 2)
        return self.head(x)


class ChannelRoll(nn.Module):
    """A fixed channel shuffle by ``torch.roll``, between a 1x1 conv and a 3x3 conv.

    torch-pruning 1.6.1 maps channels through the roll as if they stayed in place, so pruning
    ``mix`` gives a model that runs but computes something else.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(CHANNELS, 16, 1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.mix(x)).roll(3, dims=1))


class SqueezeExcite(nn.Module):
    """A conv whose channels are scaled by a squeeze-and-excitation gate computed from them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv_bn(CHANNELS, 16, 3)
        self.squeeze = nn.Conv2d(16, 8, 1)
        self.excite = nn.Conv2d(8, 16, 1)
        self.head = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        gate = torch.sigmoid(self.excite(F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(x * gate)


class GroupedDepthwise(nn.Module):
    """A grouped conv (4 groups) and a depthwise conv between two dense convs."""

    def __init__(self) -> None:
        super().__init__()
        self.dense1 = nn.Conv2d(CHANNELS, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.dense2 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.relu(self.depthwise(F.relu(self.grouped(F.relu(self.dense1(x)))))))


class DilatedStrided(nn.Module):
    """Strided, dilated, and strided-and-dilated 3x3 convs, as in segmentation backbones."""

    def __init__(self) -> None:
        super().__init__()
        self.strided = nn.Conv2d(CHANNELS, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.both = nn.Conv2d(16, 16, 3, stride=2, padding=2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.both(F.relu(self.dilated(F.relu(self.strided(x)))))


class NonSquare(nn.Module):
    """1x7 then 7x1 convs, as in Inception v3, and a 3x5 conv with stride (1, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Conv2d(CHANNELS, 16, (1, 7), padding=(0, 3))
        self.tall = nn.Conv2d(16, 16, (7, 1), padding=(3, 0))
        self.uneven = nn.Conv2d(16, 16, (3, 5), stride=(1, 2), padding=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.uneven(F.relu(self.tall(F.relu(self.wide(x)))))


class PaddingMode(nn.Module):
    """Two 3x3 convs that pad with ``mode`` (reflect, replicate or circular) instead of zeros."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.first = nn.Conv2d(CHANNELS, 16, 3, padding=1, padding_mode=mode)
        self.second = nn.Conv2d(16, 16, 3, padding=1, padding_mode=mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(F.relu(self.first(x)))


class SharedWeights(nn.Module):
    """A conv applied twice in one forward pass, and two convs tied to one weight tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.entry = nn.Conv2d(CHANNELS, 16, 3, padding=1)
        self.twice = nn.Conv2d(16, 16, 3, padding=1)
        self.tied_a = nn.Conv2d(16, 16, 3, padding=1)
        self.tied_b = nn.Conv2d(16, 16, 3, padding=1)
        self.tied_b.weight = self.tied_a.weight
        self.twice_1x1 = nn.Conv2d(16, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.entry(x))
        x = F.relu(self.twice(F.relu(self.twice(x))))
        x = self.twice_1x1(F.relu(self.twice_1x1(x)))
        return self.tied_b(F.relu(self.tied_a(x)))


class TupleOutput(nn.Module):
    """A classifier returning ``(logits, features)``, as classifiers with auxiliary outputs do."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_bn(CHANNELS, 16, 3), conv_bn(16, 16, 1), nn.Conv2d(16, 16, 3, padding=1))
        self.classifier = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(x)
        return self.classifier(features.mean(dim=(2, 3))), features


class DictOutput(nn.Module):
    """A segmentation head returning ``{"out": ..., "aux": ...}`` at the input resolution, as torchvision's models do."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(conv_bn(CHANNELS, 16, 3, stride=2), conv_bn(16, 16, 3, dilation=2, padding=2))
        self.out = nn.Sequential(conv_bn(16, 16, 1), nn.Conv2d(16, 5, 1))
        self.aux = nn.Conv2d(16, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        return {"out": self._upsample(self.out(features), x), "aux": self._upsample(self.aux(features), x)}

    @staticmethod
    def _upsample(scores: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return F.interpolate(scores, size=image.shape[-2:], mode="bilinear", align_corners=False)


class DataDependent(nn.Module):
    """A branch on the sign of the input's mean, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, 16, 3, padding=1)
        self.mix = nn.Conv2d(16, 16, 1)
        self.positive = nn.Conv2d(16, 16, 3, padding=1)
        self.negative = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positive = bool(x.mean() > 0)
        x = self.mix(F.relu(self.conv(x)))
        return self.positive(x) if positive else self.negative(x)
