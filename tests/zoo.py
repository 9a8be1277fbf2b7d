"""A zoo of architectures, written here because nothing may be fetched from a hub.

Each entry is small enough to run in milliseconds on a CPU but keeps the structure that makes
its family hard for a rewriting tool: residual adds with BatchNorm, parallel branches and
concatenation, transposed convs and skips, depthwise blocks, data-dependent control flow,
tuple and dict outputs, functional convs on parameters, shared conv modules, iterative
refinement, conv subclasses; and the shapes of models people bring (issue 35): a U-Net whose
output is a diffusers-style dataclass without pytree key paths, a YOLO-style detection head
whose shape cache fixes the batch under torch.export, a CRNN recogniser with an LSTM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class VGGLike(nn.Module):
    def __init__(self, widths=(8, 16, 32), classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True)]
            layers += [nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(cin * 4 * 4, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=groups, bias=False)  # ResNeXt when groups > 1
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class ResNetLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, 2))
        self.layer3 = nn.Sequential(Bottleneck(16, 8, 32, 2, groups=2))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InceptionBlock(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.b1 = nn.Conv2d(cin, 8, 1)
        self.b3 = nn.Sequential(nn.Conv2d(cin, 6, 1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.b5 = nn.Sequential(nn.Conv2d(cin, 4, 1), nn.ReLU(), nn.Conv2d(4, 8, 5, padding=2))
        # Factorised 7x7 of Inception-v3: non-square kernels.
        self.b7 = nn.Sequential(nn.Conv2d(cin, 4, (1, 7), padding=(0, 3)), nn.Conv2d(4, 8, (7, 1), padding=(3, 0)))
        self.pool = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(cin, 8, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.b7(x), self.pool(x)], 1)


class InceptionLike(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.mixed = InceptionBlock(16)
        # Only called in training mode, as Inception-v3's auxiliary head.
        self.aux = nn.Sequential(nn.Conv2d(40, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))
        self.fc = nn.Linear(40, classes)

    def forward(self, x):
        x = self.mixed(self.stem(x))
        logits = self.fc(x.mean((2, 3)))
        if self.training:
            return logits, self.aux(x)
        return logits


class UNet(nn.Module):
    def __init__(self, cin: int = 3, classes: int = 2, w: int = 8) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1, padding_mode="reflect"), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, padding=2, dilation=2), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2)
        self.dec2 = nn.Sequential(nn.Conv2d(4 * w, 2 * w, 3, padding="same"), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.dec1 = nn.Sequential(nn.Conv2d(2 * w, w, 3, padding=1, padding_mode="replicate"), nn.ReLU())
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class MobileNetLike(nn.Module):
    """Depthwise-separable blocks; with ``stem=False`` not one standard conv is left."""

    def __init__(self, stem: bool = True, classes: int = 10) -> None:
        super().__init__()
        first = conv_bn(3, 16, 3, 2) if stem else nn.Sequential(conv_bn(3, 3, 3, 2, groups=3), conv_bn(3, 16, 1))
        blocks = [first]
        for cin, cout, s in [(16, 24, 2), (24, 32, 1), (32, 32, 2)]:
            blocks += [conv_bn(cin, cin, 3, s, groups=cin), conv_bn(cin, cout, 1)]
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Linear(32, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class EarlyExit(nn.Module):
    """Data-dependent control flow: fx cannot trace the top-level forward."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.exit1 = nn.Linear(8, classes)
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.conv_final = nn.Conv2d(16, 16, 3, padding=1)
        self.exit2 = nn.Linear(16, classes)

    def forward(self, x):
        x = self.stage1(x)
        logits = self.exit1(x.mean((2, 3)))
        if logits.softmax(-1).max() > 0.99:  # confident enough: stop early
            return logits
        x = self.conv_final(self.stage2(x))
        return self.exit2(x.mean((2, 3)))


class RefineLoop(nn.Module):
    """Iterative refinement until convergence (optical-flow style): untraceable loop."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(6, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
        self.update = nn.Conv2d(16 + 2, 2, 3, padding=1)

    def forward(self, image1, image2):
        feats = self.encoder(torch.cat([image1, image2], 1))
        flow = feats.new_zeros(feats.shape[0], 2, *feats.shape[2:])
        for _ in range(6):
            delta = torch.tanh(self.update(torch.cat([feats, flow], 1)))
            flow = flow + 0.1 * delta
            if delta.abs().max() < 1e-3:
                break
        return flow


class DetectorLike(nn.Module):
    """Backbone, FPN and per-level heads returning a dict of lists and a tuple."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.c2 = conv_bn(3, 8, 3, 2)
        self.c3 = conv_bn(8, 16, 3, 2)
        self.lateral2 = nn.Conv2d(8, 8, 1)
        self.lateral3 = nn.Conv2d(16, 8, 1)
        self.smooth = nn.Conv2d(8, 8, 3, padding=1)  # shared across levels
        self.cls_head = nn.Conv2d(8, classes, 3, padding=1)
        self.box_head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        f2 = self.c2(x)
        f3 = self.c3(f2)
        p3 = self.lateral3(f3)
        p2 = self.lateral2(f2) + F.interpolate(p3, scale_factor=2.0, mode="nearest")
        levels = [self.smooth(p2), self.smooth(p3)]
        return {"logits": [self.cls_head(p) for p in levels], "boxes": tuple(self.box_head(p) for p in levels)}


class FunctionalConvNet(nn.Module):
    """Convs written with F.conv2d on parameters, including one weight used at two dilations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem_weight = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.2)
        self.stem_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.shared = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)  # TridentNet-style sharing
        self.point = nn.Parameter(torch.randn(4, 8, 1, 1) * 0.1)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.stem_weight, self.stem_bias, padding=1))
        a = torch.conv2d(x, self.shared, None, 1, 1, 1, 1)
        b = F.conv2d(x, self.shared, padding=2, dilation=2)
        return F.conv2d(a + b, self.point)


class ReusedConv(nn.Module):
    """One conv module called at several places (and reachable by two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.alias = self.body

    def forward(self, x):
        x = F.relu(self.stem(x))
        for _ in range(3):
            x = F.relu(self.body(x)) + x
        return self.alias(x)


class WSConv2d(nn.Conv2d):
    """Weight-standardised conv (BiT / NFNets): its forward changes the maths."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class NamedConv(nn.Conv2d):
    """A subclass that only adds a label: the maths is Conv2d's."""

    def __init__(self, *args, label: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label = label


class SubclassNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ws = WSConv2d(3, 8, 3, padding=1)
        self.named = NamedConv(8, 8, 3, padding=1, padding_mode="circular", label="mid")
        self.head = nn.Conv2d(8, 4, (3, 5), padding=(1, 2), stride=(1, 2))

    def forward(self, x):
        return self.head(F.relu(self.named(F.relu(self.ws(x)))))


class TwoInputs(nn.Module):
    """Two inputs, a tuple output (siamese / stereo style)."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.ReLU())
        self.fuse = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, rgb, depth):
        fused = self.fuse(torch.cat([self.left(rgb), self.right(depth)], 1))
        return fused, fused.mean((2, 3))


class BasicConv(nn.Module):
    """Inception-v3's BasicConv2d: conv, BatchNorm, ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, **options) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, bias=False, **options)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionAux(nn.Module):
    """Inception-v3's auxiliary head, scaled down: pooled to 4x4, then a conv to 1x1 followed by BatchNorm."""

    def __init__(self, cin: int, classes: int) -> None:
        super().__init__()
        self.conv0 = BasicConv(cin, 8, 1)
        self.conv1 = BasicConv(8, 12, 4)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        x = self.conv1(self.conv0(F.avg_pool2d(x, 5, 3)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InceptionV3Like(nn.Module):
    """The aux head gated as inception-v3 gates it (``if self.training and self.aux_logits``), on 32x32 images."""

    def __init__(self, classes: int = 10, aux_logits: bool = True) -> None:
        super().__init__()
        self.aux_logits = aux_logits
        self.stem = BasicConv(3, 16, 3, stride=2, padding=1)
        self.mixed = BasicConv(16, 16, 3, padding=1)
        self.AuxLogits = InceptionAux(16, classes) if aux_logits else None
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.mixed(self.stem(x))
        aux = self.AuxLogits(x) if self.training and self.aux_logits else None
        logits = self.fc(self.dropout(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))
        return (logits, aux) if aux is not None else logits


@dataclass
class UNetOutput:
    """A diffusers-style output: a dataclass registered as a pytree node without key paths
    (``register_pytree_node`` with no ``flatten_with_keys_fn``), as every diffusers model returns."""

    sample: torch.Tensor


torch.utils._pytree.register_pytree_node(UNetOutput, lambda out: ([out.sample], None), lambda values, _: UNetOutput(*values))


class DataclassUNet(UNet):
    """The U-Net above, its output wrapped as diffusers wraps a UNet2DModel's."""

    def forward(self, x):
        return UNetOutput(super().forward(x))


class ShapeCacheDetect(nn.Module):
    """A YOLO-style detection head: per-level conv branches in a ModuleList, and anchors made again
    only when the features' shape changes (``if self.shape != shape``), which fixes the batch
    under torch.export and makes the forward untraceable by fx."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8, 3, 2), conv_bn(8, 16, 3, 2))
        self.down = conv_bn(16, 16, 3, 2)
        self.cv = nn.ModuleList(nn.Sequential(conv_bn(16, 16, 3), nn.Conv2d(16, 4 + classes, 1)) for _ in range(2))
        self.shape = None
        self.anchors = torch.empty(0)

    def forward(self, x):
        p3 = self.stem(x)
        levels = [p3, self.down(p3)]
        shape = p3.shape
        if self.shape != shape:  # the shape cache of ultralytics' Detect head
            self.anchors = torch.cat([torch.arange(f.shape[2] * f.shape[3], dtype=x.dtype) for f in levels])
            self.shape = shape
        out = torch.cat([branch(f).flatten(2) for branch, f in zip(self.cv, levels)], 2)
        return out + self.anchors


class RecurrentOCR(nn.Module):
    """A CRNN text recogniser: a conv stack pooled to height 1, a bidirectional LSTM over the width, a linear classifier."""

    def __init__(self, classes: int = 12, hidden: int = 16) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv_bn(3, 8, 3), nn.MaxPool2d(2), conv_bn(8, 16, 3), nn.MaxPool2d(2), conv_bn(16, 16, 3))
        self.rnn = nn.LSTM(16, hidden, bidirectional=True)
        self.fc = nn.Linear(2 * hidden, classes)

    def forward(self, x):
        f = self.convs(x).mean(2).permute(2, 0, 1)  # (width, batch, channels)
        return self.fc(self.rnn(f)[0])


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    # Convs that must stay dense even at an explicit rank, with a word of their reason.
    stays_dense: dict[str, str] = field(default_factory=dict)
    # Parts fx cannot trace whole that leave a conv dense (one it cannot see); other untraceable parts are not reported.
    untraced: tuple[str, ...] = ()


def _img(c: int = 3, s: int = 32, n: int = 2) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(n, c, s, s),)


ZOO: list[ZooModel] = [
    ZooModel("vgg", VGGLike, _img()),
    ZooModel("resnet", ResNetLike, _img(), {"layer2.0.downsample.0": "1x1", "layer3.0.conv1": "1x1", "layer3.0.conv3": "1x1", "layer3.0.downsample.0": "1x1"}),
    ZooModel("inception", InceptionLike, _img(), {"mixed.b1": "1x1", "mixed.b3.0": "1x1", "mixed.b5.0": "1x1", "mixed.pool.1": "1x1"}),
    ZooModel("unet", UNet, _img(), {"head": "1x1"}),
    ZooModel("mobilenet", MobileNetLike, _img()),
    ZooModel("early_exit", EarlyExit, _img()),  # fx cannot trace the model, and needs not: its convs are modules
    ZooModel("refine_loop", RefineLoop, lambda: (torch.randn(1, 3, 16, 16), torch.randn(1, 3, 16, 16))),
    ZooModel("detector", DetectorLike, _img(), {"lateral2": "1x1", "lateral3": "1x1"}),
    ZooModel("functional", FunctionalConvNet, _img(), {"point": "1x1"}),
    ZooModel("reused", ReusedConv, _img()),
    ZooModel("subclass", SubclassNet, _img()),
    ZooModel("two_inputs", TwoInputs, lambda: (torch.randn(2, 3, 16, 16), torch.randn(2, 1, 16, 16))),
    ZooModel("unet_dataclass", DataclassUNet, _img(), {"head": "1x1"}),
    ZooModel("shape_cache_detect", ShapeCacheDetect, _img(), {"cv.0.1": "1x1", "cv.1.1": "1x1"}),
    ZooModel("recurrent_ocr", RecurrentOCR, lambda: (torch.randn(2, 3, 16, 32),)),
]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers trained-looking statistics so they are not identities."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.affine:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def build(entry: ZooModel, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    model = randomize_batchnorm(entry.build()).eval()
    return model, entry.inputs()
