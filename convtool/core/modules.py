"""SeparableConv2d: the module a dense Conv2d becomes."""

from __future__ import annotations

import contextlib
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
    """A depthwise-then-pointwise pair of rank r written as r depthwise convs of multiplier 1.

    The same function as the ``"dw-pw"`` :class:`SeparableConv2d` it is built from: branch i
    holds filter i of every channel, the branches are concatenated, and the pointwise weight's
    columns are permuted to match. Runtimes run multiplier-1 depthwise convs on fast paths that
    a channel multiplier misses (see benchmarks/RESULTS.md), so this is the form convtool
    exports for ranks above 1.
    """

    def __init__(self, pair: SeparableConv2d) -> None:
        super().__init__()
        if pair.order != "dw-pw":
            raise ValueError("only depthwise-then-pointwise pairs have a branched form")
        dw, pw, r, m = pair.depthwise, pair.pointwise, pair.rank, pair.in_channels
        self.in_channels, self.out_channels, self.rank = pair.in_channels, pair.out_channels, r
        self.kernel_size, self.stride, self.padding = pair.kernel_size, pair.stride, pair.padding
        self.dilation, self.groups, self.order = pair.dilation, pair.groups, pair.order
        self.weight_error = pair.weight_error
        options = dict(
            kernel_size=dw.kernel_size, stride=dw.stride, padding=dw.padding, dilation=dw.dilation,
            padding_mode=dw.padding_mode, bias=False, device=dw.weight.device, dtype=dw.weight.dtype,
        )
        self.branches = nn.ModuleList(nn.Conv2d(m, m, groups=m, **options) for _ in range(r))
        self.pointwise = nn.Conv2d(
            m * r, pair.out_channels, 1, groups=pw.groups, bias=pw.bias is not None,
            device=pw.weight.device, dtype=pw.weight.dtype,
        )
        g = pw.groups
        with torch.no_grad():
            for i, branch in enumerate(self.branches):
                branch.weight.copy_(dw.weight[i::r])
            # Pointwise input (m, i) moves from m*r + i to i*M + m; per group the same holds,
            # since the concatenation keeps each group's channels apart only when g == 1.
            order = torch.arange(m * r).reshape(m, r).t().reshape(-1)  # new channel j <- old order[j]
            if g == 1:
                self.pointwise.weight.copy_(pw.weight[:, order])
            else:
                raise ValueError("grouped pointwise convs keep the multiplier form")
            if pw.bias is not None:
                self.pointwise.bias.copy_(pw.bias)
        self.train(pair.training)

    @property
    def last(self) -> nn.Conv2d:
        return self.pointwise

    @property
    def bias(self) -> Tensor | None:
        return self.pointwise.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(torch.cat([branch(x) for branch in self.branches], 1))


def last_conv(module: nn.Module) -> nn.Conv2d | None:
    """The conv that runs last in a dense conv (itself) or a pair; None for anything else."""
    if isinstance(module, (SeparableConv2d, BranchedSeparableConv2d)):
        return module.last
    return module if isinstance(module, nn.Conv2d) else None
