"""SeparableConv2d: the module a dense Conv2d becomes."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor, nn

from .decompose import ORDERS, dense_weight, separable_factors


_WEIGHT_READS: list[set[int]] = []


@contextlib.contextmanager
def watching_weight_reads() -> Iterator[set[int]]:
    """Collects the ids of the pairs whose dense-equivalent ``weight`` is read inside the block."""
    reads: set[int] = set()
    _WEIGHT_READS.append(reads)
    try:
        yield reads
    finally:
        _WEIGHT_READS.remove(reads)


class SeparableConv2d(nn.Module):
    """A dense Conv2d factored into a depthwise (spatial) and a pointwise (1x1) conv.

    ``order="dw-pw"`` runs ``depthwise`` then ``pointwise`` (MobileNet); ``order="pw-dw"``
    runs ``pointwise`` then ``depthwise`` (BSConv-U). Either way the spatial conv carries the
    original stride, padding, dilation and padding mode, and the last conv carries the bias,
    so the pair has the same input/output contract as the conv it replaces. Both halves are
    plain ``nn.Conv2d`` modules, so the pair exports to standard ONNX ``Conv`` nodes.

    The dense conv's hyper-parameters stay readable as attributes (``in_channels``,
    ``kernel_size``, ...) because surrounding code often reads them from the layer it calls.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rank: int = 1,
        order: str = "dw-pw",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.groups, self.padding_mode = groups, padding_mode
        self.rank, self.order = rank, order
        # Relative Frobenius error of the SVD factors against the dense weight they came from
        # (0.0 = exact); NaN for a pair built empty rather than from a dense conv.
        self.weight_error = float("nan")
        spatial_opts = dict(
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
        )
        if order == "dw-pw":
            self.depthwise = nn.Conv2d(
                in_channels, in_channels * rank, groups=in_channels, bias=False, **spatial_opts
            )
            self.pointwise = nn.Conv2d(
                in_channels * rank, out_channels, 1, groups=groups, bias=bias, device=device, dtype=dtype
            )
        else:
            self.pointwise = nn.Conv2d(
                in_channels, out_channels * rank, 1, groups=groups, bias=False, device=device, dtype=dtype
            )
            self.depthwise = nn.Conv2d(
                out_channels * rank, out_channels, groups=out_channels, bias=bias, **spatial_opts
            )

    @property
    def last(self) -> nn.Conv2d:
        """The conv that runs last: it holds the bias, and calibration and BatchNorm folding change it."""
        return self.pointwise if self.order == "dw-pw" else self.depthwise

    @property
    def bias(self) -> Tensor | None:
        """The pair's bias, held by whichever conv runs last."""
        return self.last.bias

    @property
    def weight(self) -> Tensor:
        """The dense weight this pair computes (N, M/g, kh, kw), recomputed on each read.

        Code written for the dense conv (``self.conv.weight.shape``, weight decay on it, a
        norm of it) keeps working; writing to it changes nothing. Reads are seen by
        :func:`watching_weight_reads`: code that applies this weight itself does not run the pair.
        """
        for reads in _WEIGHT_READS:
            reads.add(id(self))
        spatial, mixing = self.depthwise.weight, self.pointwise.weight
        return dense_weight(spatial, mixing, self.rank, self.groups, self.order)

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "dw-pw":
            return self.pointwise(self.depthwise(x))
        return self.depthwise(self.pointwise(x))

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, rank={self.rank}, order={self.order!r}"
        )

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: int = 1, order: str = "dw-pw") -> "SeparableConv2d":
        """The rank-``rank`` separable pair closest to ``conv``, on its device and dtype.

        ``rank`` is clamped to the rank at which the factorisation is exact. The result is
        in the same train/eval mode as ``conv`` and its parameters keep ``requires_grad``.
        """
        return cls.from_weight(
            conv.weight,
            conv.bias,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            padding_mode=conv.padding_mode,
            rank=rank,
            order=order,
        ).train(conv.training)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        rank: int = 1,
        order: str = "dw-pw",
    ) -> "SeparableConv2d":
        """The separable pair for a conv given by its tensors (as in ``F.conv2d``)."""
        factors = separable_factors(weight, rank, groups=groups, order=order)
        n, m_g, kh, kw = weight.shape
        module = cls(
            m_g * groups,
            n,
            (kh, kw),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
            padding_mode=padding_mode,
            rank=factors.rank,
            order=order,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            module.depthwise.weight.copy_(factors.spatial)
            module.pointwise.weight.copy_(factors.mixing)
            if bias is not None:
                module.bias.copy_(bias.detach())
        grad = weight.requires_grad
        for p in module.parameters():
            p.requires_grad_(grad)
        module.weight_error = factors.weight_error
        return module


class BranchedSeparableConv2d(nn.Module):
    """A separable pair of rank r written with r depthwise convs of multiplier 1.

    The same function as the :class:`SeparableConv2d` it is built from. For ``"dw-pw"``,
    branch i holds filter i of every input channel, the branches are concatenated and the
    pointwise weight's columns are permuted to match. For ``"pw-dw"``, whose depthwise conv
    takes r channels per group, the pointwise's outputs are permuted so that branch i reads a
    contiguous block of one channel per output, and the branches' outputs are summed (the
    bias on the first). Runtimes run multiplier-1 depthwise convs on fast paths that channel
    multipliers and r-input groups miss (see benchmarks/RESULTS.md), so this is the form
    convtool exports for ranks above 1.
    """

    def __init__(self, pair: SeparableConv2d) -> None:
        super().__init__()
        if pair.groups != 1:
            raise ValueError("grouped pairs keep their form: their pointwise channels cannot be reordered across groups")
        dw, pw, r = pair.depthwise, pair.pointwise, pair.rank
        self.in_channels, self.out_channels, self.rank = pair.in_channels, pair.out_channels, r
        self.kernel_size, self.stride, self.padding = pair.kernel_size, pair.stride, pair.padding
        self.dilation, self.groups, self.order = pair.dilation, pair.groups, pair.order
        self.weight_error = pair.weight_error
        width = pair.in_channels if pair.order == "dw-pw" else pair.out_channels  # channels of each branch
        options = dict(
            kernel_size=dw.kernel_size, stride=dw.stride, padding=dw.padding, dilation=dw.dilation,
            padding_mode=dw.padding_mode, device=dw.weight.device, dtype=dw.weight.dtype,
        )
        has_bias = pair.bias is not None
        self.branches = nn.ModuleList(
            nn.Conv2d(width, width, groups=width, bias=has_bias and pair.order == "pw-dw" and i == 0, **options)
            for i in range(r)
        )
        pw_in, pw_out = pw.in_channels, pw.out_channels
        self.pointwise = nn.Conv2d(
            pw_in, pw_out, 1, bias=has_bias and pair.order == "dw-pw", device=pw.weight.device, dtype=pw.weight.dtype,
        )
        # Channel (c, i) of the r per channel moves from c*r + i to i*width + c.
        order = torch.arange(width * r).reshape(width, r).t().reshape(-1)  # new channel j <- old order[j]
        with torch.no_grad():
            if pair.order == "dw-pw":
                for i, branch in enumerate(self.branches):
                    branch.weight.copy_(dw.weight[i::r])
                self.pointwise.weight.copy_(pw.weight[:, order])
            else:  # depthwise weight (N, r, kh, kw): filter i of output n reads pointwise channel n*r + i
                for i, branch in enumerate(self.branches):
                    branch.weight.copy_(dw.weight[:, i : i + 1])
                self.pointwise.weight.copy_(pw.weight[order])
            if has_bias:
                self.bias.copy_(pair.bias)
        self.train(pair.training)

    @property
    def last(self) -> nn.Conv2d | None:
        """The conv that runs last (None for ``"pw-dw"``: r branches do)."""
        return self.pointwise if self.order == "dw-pw" else None

    @property
    def bias(self) -> Tensor | None:
        return self.pointwise.bias if self.order == "dw-pw" else self.branches[0].bias

    def forward(self, x: Tensor) -> Tensor:
        if self.order == "dw-pw":
            return self.pointwise(torch.cat([branch(x) for branch in self.branches], 1))
        y = self.pointwise(x).chunk(self.rank, 1)
        out = self.branches[0](y[0])
        for branch, part in zip(self.branches[1:], y[1:]):
            out = out + branch(part)
        return out


class WidthOneConv2d(nn.Module):
    """A k x 1 conv run as a 1 x k conv, for inputs of width 1 (1-D signals stored as images).

    The same function: the weight, stride, padding and dilation are transposed, and so is
    the input, which for width 1 is a reshape. onnxruntime's CPU depthwise kernel runs a
    1 x k kernel on a (C, 1, L) input several times faster than the k x 1 kernel on (C, L, 1)
    (benchmarks/RESULTS.md); on wider inputs the transposes cost more than they save, so
    convtool uses this form only where it saw width 1.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        flip = lambda v: v if isinstance(v, str) else tuple(v)[::-1]  # noqa: E731
        self.conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, flip(conv.kernel_size), stride=flip(conv.stride),
            padding=flip(conv.padding), dilation=flip(conv.dilation), groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.transpose(2, 3))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)
        self.train(conv.training)

    @property
    def weight(self) -> Tensor:
        """The weight in the original k x 1 orientation."""
        return self.conv.weight.transpose(2, 3)

    @property
    def bias(self) -> Tensor | None:
        return self.conv.bias

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        y = self.conv(x.reshape(n, c, 1, h) if w == 1 else x.transpose(2, 3))
        return y.reshape(n, y.shape[1], y.shape[3], 1) if y.shape[2] == 1 else y.transpose(2, 3)


def runtime_forms(pair: SeparableConv2d, widths: set[int] | None = None) -> list[nn.Module]:
    """Every exact form convtool can ship ``pair`` in, the preferred last.

    As built; as multiplier-1 branches (ungrouped pairs of rank > 1); and either of those with
    its k x 1 depthwise kernels run as 1 x k, when ``widths`` (the widths of the inputs the
    pair's depthwise conv was called on) are all 1. New modules, except the pair itself.
    """
    forms: list[nn.Module] = [pair]
    if pair.rank > 1 and pair.groups == 1:
        forms.append(BranchedSeparableConv2d(pair))
    kh, kw = pair.kernel_size
    if kh > 1 and kw == 1 and widths == {1}:
        forms += [_width_one(form) for form in forms]
    return forms


def _width_one(form: nn.Module) -> nn.Module:
    form = copy.deepcopy(form)
    if isinstance(form, BranchedSeparableConv2d):
        form.branches = nn.ModuleList(WidthOneConv2d(c) for c in form.branches)
    else:
        form.depthwise = WidthOneConv2d(form.depthwise)
    return form


def last_conv(module: nn.Module) -> nn.Conv2d | None:
    """The conv that runs last in a dense conv (itself) or a pair; None for anything else."""
    if isinstance(module, (SeparableConv2d, BranchedSeparableConv2d)):
        return module.last if isinstance(module.last, nn.Conv2d) else None
    return module if isinstance(module, nn.Conv2d) else None
