"""Reference architectures for the benchmarks, written here (no torchvision on this machine).

They follow torchvision's ResNet and VGG layer for layer, so parameter counts match the
published models (ResNet-18: 11.7M, ResNet-50: 25.6M, VGG-16: 138.4M).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: list[int], classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages = []
        for i, (planes, count) in enumerate(zip([64, 128, 256, 512], layers)):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    def __init__(self, config: list, classes: int = 1000, hidden: int = 4096) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                cin = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(cin * 49, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, hidden), nn.ReLU(True),
            nn.Dropout(), nn.Linear(hidden, classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def resnet18() -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2])


def resnet50() -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3])


def vgg16() -> VGG:
    return VGG([64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"])


def vgg11_narrow() -> VGG:
    """A VGG-11 at half width: VGG's shape at a size that fits latency runs on two cores."""
    return VGG([32, "M", 64, "M", 128, 128, "M", 256, 256, "M", 256, 256, "M"], classes=1000, hidden=1024)




class TallKernelNet(nn.Module):
    """Long 1-d signals as (N, 1024, L, 1) images with 64x1 kernels: 1,024 -> 128 then 128 -> 128.

    About 1.4 GFLOPs per input of length 1,024 (issue 12's model of tall kernels). Trained-looking
    weights are not needed for timing; for accuracy benchmarks train it first.
    """

    def __init__(self, channels: int = 1024, width: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, (64, 1), stride=(8, 1), padding=(28, 0)), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(width, width, (64, 1), padding="same"), nn.BatchNorm2d(width), nn.ReLU()) for _ in range(3))
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def tall_kernel_net() -> TallKernelNet:
    return TallKernelNet()


class JasperLike(nn.Module):
    """A Jasper/QuartzNet-sized 1-d speech encoder before its separable era: dense Conv1d blocks on mel frames.

    64 mel bins in, a strided prologue (k = 11), three residual blocks of two k = 13, 17, 21
    convs at 256 channels, an epilogue (k = 29, dilation 2) and a 1x1 head: about 5.3 GFLOPs
    on 10 s of frames (1, 64, 1000).
    """

    def __init__(self, mels: int = 64, width: int = 256, classes: int = 29) -> None:
        super().__init__()
        unit = lambda cin, cout, k, **kw: nn.Sequential(  # noqa: E731
            nn.Conv1d(cin, cout, k, padding=kw.pop("padding", k // 2), bias=False, **kw), nn.BatchNorm1d(cout), nn.ReLU())
        self.prologue = unit(mels, width, 11, stride=2, padding=5)
        self.blocks = nn.ModuleList(nn.Sequential(unit(width, width, k), unit(width, width, k)) for k in (13, 17, 21))
        self.epilogue = unit(width, 2 * width, 29, dilation=2, padding=28)
        self.head = nn.Conv1d(2 * width, classes, 1)

    def forward(self, x):
        x = self.prologue(x)
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.head(self.epilogue(x))


class C3DLike(nn.Module):
    """A C3D/3-D-U-Net-encoder-like video or volume net: 3x3x3 Conv3d stacks with pooling.

    (1, 3, 16, 56, 56) clips; channels 32 -> 64 -> 128 -> 128; about 2.0 GFLOPs.
    """

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        unit = lambda cin, cout: nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU())  # noqa: E731
        self.features = nn.Sequential(
            unit(3, 32), nn.MaxPool3d((1, 2, 2)), unit(32, 64), nn.MaxPool3d(2), unit(64, 128), unit(128, 128), nn.MaxPool3d(2),
            unit(128, 128),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3, 4)))


def jasper_like() -> JasperLike:
    return JasperLike()


def c3d_like() -> C3DLike:
    return C3DLike()


ARCHITECTURES = {
    "resnet18": resnet18, "resnet50": resnet50, "vgg16": vgg16, "vgg11-narrow": vgg11_narrow, "tall-kernel": tall_kernel_net,
    "jasper": jasper_like, "c3d": c3d_like,
}


class TallKernelDigits(nn.Module):
    """A 1-d-style net with tall 64x1 kernels, trained on real data: digits read as raster-scanned signals.

    Each 8x8 digit, upsampled to 16x16 and read row by row, is a 256-sample signal, given as a
    (N, 1, 256, 1) image. A stride-2 64x1 stem (one input channel: nothing to separate) feeds
    three 64x1 convs of 24 channels, the kind of layer issue 15 found hard to separate.
    """

    def __init__(self, width: int = 24, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, (64, 1), stride=(2, 1), padding=(31, 0)), nn.BatchNorm2d(width), nn.ReLU())
        self.body = nn.Sequential(
            *(nn.Sequential(nn.Conv2d(width, width, (64, 1), padding="same"), nn.BatchNorm2d(width), nn.ReLU()) for _ in range(3))
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def raster_signals(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) digits as (N, 1, 256, 1) signals: upsampled to 16x16, read row by row."""
    up = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return up.reshape(len(images), 1, 256, 1)


def train_tall_kernel_digits(train_x: torch.Tensor, train_y: torch.Tensor, epochs: int = 25, seed: int = 0) -> TallKernelDigits:
    """A TallKernelDigits trained on raster-scanned digits; deterministic for a seed on the CPU."""
    import torch.nn.functional as F

    torch.manual_seed(seed)
    x = raster_signals(train_x)
    model = TallKernelDigits()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * ((len(train_y) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            loss = F.cross_entropy(model(x[batch]), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()
