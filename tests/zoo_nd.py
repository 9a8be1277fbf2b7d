"""A zoo of convs of every type: 1-D, 3-D, transposed, lazy, weight-normed and timm-style subclasses.

``tests/zoo.py`` covers 2-D architectures; this zoo keeps the structure of families built on
other convs: a wav2vec2 feature encoder (strided Conv1d, a grouped weight-normed positional
conv), a HiFi-GAN generator (ConvTranspose1d, dilated Conv1d, weight norm everywhere), a 3-D
U-Net (Conv3d, ConvTranspose3d), a DCGAN generator (ConvTranspose2d, and a call with
``output_size=``), timm's padding-same and weight-standardised Conv2d subclasses, lazy convs
and a causal TCN (Conv1d with manual causal padding, reflect padding and an ``F.conv1d``).
Everything is written here and small enough to run in milliseconds on a CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .zoo import ZooModel

# 1. wav2vec2 feature encoder (after Hugging Face's Wav2Vec2 with feat_extract_norm="group").


class Wav2Vec2GroupNormConvLayer(nn.Module):
    """First encoder layer: conv, then GroupNorm with one group per channel, then GELU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, stride, bias=False)
        self.layer_norm = nn.GroupNorm(num_groups=cout, num_channels=cout, affine=True)
        self.activation = nn.GELU()

    def forward(self, x):
        return self.activation(self.layer_norm(self.conv(x)))


class Wav2Vec2NoLayerNormConvLayer(nn.Module):
    """Later encoder layers: conv, then GELU."""

    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, k, stride, bias=False)
        self.activation = nn.GELU()

    def forward(self, x):
        return self.activation(self.conv(x))


class Wav2Vec2FeatureEncoder(nn.Module):
    """Strided Conv1d stack turning a raw waveform into frames: (batch, 1, samples) -> (batch, C, T)."""

    def __init__(self, dim: int = 32, layers=((10, 5), (3, 2), (3, 2), (2, 2), (2, 2))) -> None:
        super().__init__()
        (k0, s0), *rest = layers
        convs: list[nn.Module] = [Wav2Vec2GroupNormConvLayer(1, dim, k0, s0)]
        convs += [Wav2Vec2NoLayerNormConvLayer(dim, dim, k, s) for k, s in rest]
        self.conv_layers = nn.ModuleList(convs)

    def forward(self, x):
        for layer in self.conv_layers:
            x = layer(x)
        return x


class Wav2Vec2FeatureProjection(nn.Module):
    """LayerNorm and Linear over the channels of each frame."""

    def __init__(self, cin: int, hidden: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(cin)
        self.projection = nn.Linear(cin, hidden)

    def forward(self, x):
        return self.projection(self.layer_norm(x))


class Wav2Vec2SamePadLayer(nn.Module):
    """Drops the extra time step an even kernel with padding k // 2 adds."""

    def __init__(self, kernel_size: int) -> None:
        super().__init__()
        self.num_pad_remove = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x):
        return x[:, :, : -self.num_pad_remove] if self.num_pad_remove > 0 else x


class Wav2Vec2PositionalConvEmbedding(nn.Module):
    """Grouped Conv1d with weight norm over the kernel dim (dim=2), as wav2vec2's relative positions."""

    def __init__(self, hidden: int, kernel_size: int = 16, groups: int = 4) -> None:
        super().__init__()
        conv = nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=groups)
        self.conv = weight_norm(conv, name="weight", dim=2)
        self.padding = Wav2Vec2SamePadLayer(kernel_size)
        self.activation = nn.GELU()

    def forward(self, x):  # (batch, time, hidden)
        x = self.activation(self.padding(self.conv(x.transpose(1, 2))))
        return x.transpose(1, 2)


class Wav2Vec2Like(nn.Module):
    """wav2vec2 up to its transformer: feature encoder, projection, positional conv embedding added back."""

    def __init__(self, conv_dim: int = 32, hidden: int = 48) -> None:
        super().__init__()
        self.feature_extractor = Wav2Vec2FeatureEncoder(conv_dim)
        self.feature_projection = Wav2Vec2FeatureProjection(conv_dim, hidden)
        self.pos_conv_embed = Wav2Vec2PositionalConvEmbedding(hidden)
        self.layer_norm = nn.LayerNorm(hidden)

    def forward(self, waveform):  # (batch, 1, samples)
        features = self.feature_extractor(waveform).transpose(1, 2)  # (batch, time, conv_dim)
        hidden = self.feature_projection(features)
        hidden = hidden + self.pos_conv_embed(hidden)
        return self.layer_norm(hidden)  # (batch, time, hidden)


# 2. HiFi-GAN generator (after jik876/hifi-gan, ResBlock1), weight norm on every conv.

LRELU_SLOPE = 0.1


def hifigan_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class HiFiGANResBlock(nn.Module):
    """Dilated convs (1, 3, 5), each followed by an undilated conv, with leaky ReLUs and residual adds."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation=(1, 3, 5)) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=d, padding=hifigan_padding(kernel_size, d))) for d in dilation
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, 1, dilation=1, padding=hifigan_padding(kernel_size, 1))) for _ in dilation
        )

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            xt = c1(F.leaky_relu(x, LRELU_SLOPE))
            xt = c2(F.leaky_relu(xt, LRELU_SLOPE))
            x = xt + x
        return x


class HiFiGANGenerator(nn.Module):
    """Mel (batch, mels, frames) -> waveform (batch, 1, frames * prod(rates)) by transposed-conv upsampling and MRF blocks."""

    def __init__(self, mels: int = 20, channels: int = 64, rates=(4, 2), kernels=(3, 5)) -> None:
        super().__init__()
        self.num_kernels = len(kernels)
        self.conv_pre = weight_norm(nn.Conv1d(mels, channels, 7, 1, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        c = channels
        for u in rates:
            # Output length exactly L * u, for odd as well as even u.
            up = nn.ConvTranspose1d(c, c // 2, 2 * u, u, padding=u // 2 + u % 2, output_padding=u % 2)
            self.ups.append(weight_norm(up))
            c //= 2
            self.resblocks.extend(HiFiGANResBlock(c, k) for k in kernels)
        self.conv_post = weight_norm(nn.Conv1d(c, 1, 7, 1, padding=3))

    def forward(self, x):
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            xs = None
            for j in range(self.num_kernels):
                y = self.resblocks[i * self.num_kernels + j](x)
                xs = y if xs is None else xs + y
            x = xs / self.num_kernels
        return torch.tanh(self.conv_post(F.leaky_relu(x)))


# 3. 3-D U-Net for medical volumes (after Çiçek et al. 2016, with BatchNorm).


class DoubleConv3d(nn.Module):
    """[Conv3d 3x3x3, BatchNorm3d, ReLU] x 2."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.double_conv(x)


class UNet3d(nn.Module):
    """Two encoder levels, a bottleneck, ConvTranspose3d up-sampling with skip concatenation, a 1x1x1 head."""

    def __init__(self, cin: int = 1, classes: int = 2, w: int = 8) -> None:
        super().__init__()
        self.enc1 = DoubleConv3d(cin, w)
        self.enc2 = DoubleConv3d(w, 2 * w)
        self.pool = nn.MaxPool3d(2)
        self.bottleneck = DoubleConv3d(2 * w, 4 * w)
        self.up2 = nn.ConvTranspose3d(4 * w, 2 * w, kernel_size=2, stride=2)
        self.dec2 = DoubleConv3d(4 * w, 2 * w)
        self.up1 = nn.ConvTranspose3d(2 * w, w, kernel_size=2, stride=2)
        self.dec1 = DoubleConv3d(2 * w, w)
        self.head = nn.Conv3d(w, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottleneck(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


# 4. DCGAN generator (after the PyTorch DCGAN example), and a deconv called with output_size=.


class DCGANGenerator(nn.Module):
    """Latent (batch, nz, 1, 1) -> image (batch, 3, 32, 32) by four ConvTranspose2d layers."""

    def __init__(self, nz: int = 16, ngf: int = 16, nc: int = 3) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 4, 4, 1, 0, bias=False),  # 1 -> 4
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),  # 4 -> 8
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),  # 8 -> 16
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),  # 16 -> 32
            nn.Tanh(),
        )

    def forward(self, z):
        return self.main(z)


class DeconvOutputSize(nn.Module):
    """A stride-2 ConvTranspose2d whose output size is chosen per call: output_padding (1, 0) is implied."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, kernel_size=3, stride=2, padding=1)
        self.head = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        h, w = x.shape[-2:]
        # k=3, s=2, p=1 reaches 2n - 1 or 2n: the height takes output_padding 1, the width 0.
        y = self.up(F.relu(self.stem(x)), output_size=[h * 2, w * 2 - 1])
        return self.head(F.relu(y))


# 5. timm's conv subclasses (timm.layers.conv2d_same and timm.layers.std_conv), same semantics.


def get_same_padding(x: int, kernel_size: int, stride: int, dilation: int) -> int:
    """TF "SAME" total padding along one dim of size ``x``."""
    return max((math.ceil(x / stride) - 1) * stride + (kernel_size - 1) * dilation + 1 - x, 0)


def pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0):
    ih, iw = x.size()[-2:]
    pad_h = get_same_padding(ih, kernel_size[0], stride[0], dilation[0])
    pad_w = get_same_padding(iw, kernel_size[1], stride[1], dilation[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


def conv2d_same(x, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1):
    x = pad_same(x, weight.shape[-2:], stride, dilation)
    return F.conv2d(x, weight, bias, stride, (0, 0), dilation, groups)


class Conv2dSame(nn.Conv2d):
    """Tensorflow-like "SAME" convolution: padding computed from the input size at each call."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x):
        return conv2d_same(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def timm_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """timm's default symmetric padding (``get_padding``)."""
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardization (BiT): each filter normalised to zero mean, unit variance."""

    def __init__(self, in_channel, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1, bias=False, eps=1e-6) -> None:
        if padding is None:
            padding = timm_padding(kernel_size, stride, dilation)
        super().__init__(in_channel, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0, eps=self.eps
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ScaledStdConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardization (NFNets): a learnt gain times gamma / sqrt(fan_in)."""

    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1, bias=True, gamma=1.0, eps=1e-6, gain_init=1.0
    ) -> None:
        if padding is None:
            padding = timm_padding(kernel_size, stride, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5  # gamma / sqrt(fan_in)
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1),
            None,
            None,
            weight=(self.gain * self.scale).view(-1),
            training=True,
            momentum=0.0,
            eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class TimmStyleNet(nn.Module):
    """A SAME-padded stem, a weight-standardised and a scaled weight-standardised conv, a SAME stride-2 5x5."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = Conv2dSame(3, 16, 3, stride=2)
        self.conv1 = StdConv2d(16, 32, 3, padding=1)
        self.conv2 = ScaledStdConv2d(32, 32, 3, padding=1)
        self.down = Conv2dSame(32, 32, 5, stride=2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.down(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# 6. Lazy convs: in_channels is only known after a first forward.


class LazyNet(nn.Module):
    """LazyConv2d layers, left unmaterialised by the constructor."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.LazyConv2d(16, 3, padding=1)
        self.conv2 = nn.LazyConv2d(32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# 7. Temporal conv net (after Bai et al. 2018): causal dilated Conv1d with residuals.


class TemporalBlock(nn.Module):
    """Two causal dilated convs (left padding by F.pad), ReLU, a residual (1x1 Conv1d where channels change)."""

    def __init__(self, cin: int, cout: int, dilation: int, k: int = 3) -> None:
        super().__init__()
        self.pad = (k - 1) * dilation
        self.conv1 = nn.Conv1d(cin, cout, k, dilation=dilation)
        self.conv2 = nn.Conv1d(cout, cout, k, dilation=dilation)
        self.downsample = nn.Conv1d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        out = F.relu(self.conv1(F.pad(x, (self.pad, 0))))
        out = F.relu(self.conv2(F.pad(out, (self.pad, 0))))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class TCN(nn.Module):
    """Causal blocks at dilations 1, 2, 4, a reflect-padded 'same' Conv1d and an F.conv1d on a parameter."""

    def __init__(self, cin: int = 12, c: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(TemporalBlock(cin, c, 1), TemporalBlock(c, c, 2), TemporalBlock(c, c, 4))
        self.smooth = nn.Conv1d(c, c, 3, padding="same", padding_mode="reflect")
        self.w = nn.Parameter(torch.randn(c, c, 3) * 0.1)
        self.b = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):  # (batch, channels, time)
        x = F.relu(self.smooth(self.blocks(x)))
        return F.conv1d(x, self.w, self.b, padding=1)


ZOO_ND: list[ZooModel] = [
    ZooModel("wav2vec2", Wav2Vec2Like, lambda: (torch.randn(2, 1, 1600),), {"feature_extractor.conv_layers.0.conv": "single input channel"}),
    ZooModel("hifigan", HiFiGANGenerator, lambda: (torch.randn(1, 20, 16),)),
    ZooModel("unet3d", UNet3d, lambda: (torch.randn(1, 1, 16, 16, 16),), {"enc1.double_conv.0": "single input channel", "head": "1x1"}),
    ZooModel("dcgan", DCGANGenerator, lambda: (torch.randn(2, 16, 1, 1),)),
    ZooModel("deconv_output_size", DeconvOutputSize, lambda: (torch.randn(2, 3, 12, 16),)),
    # Plain fx.symbolic_trace fails inside Conv2dSame.forward (math.ceil / max on sizes); a tracer
    # that keeps convs as leaves (as convtool's does, and timm's own fx helpers do) traces it whole.
    # 33 x 32: SAME padding is symmetric along the height, asymmetric (one more right) along the width.
    ZooModel("timm_style", TimmStyleNet, lambda: (torch.randn(2, 3, 33, 32),)),
    ZooModel("lazy", LazyNet, lambda: (torch.randn(2, 3, 16, 16),)),
    ZooModel("tcn", TCN, lambda: (torch.randn(2, 12, 64),), {"blocks.0.downsample": "1x1"}),
]
