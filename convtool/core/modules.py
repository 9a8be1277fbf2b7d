"""SeparableConv: the module a dense conv becomes, and the exact forms it may ship in."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
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


_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE: dict[int, type[nn.Module]] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_class(dims: int, transposed: bool = False) -> type[nn.Module]:
    """``nn.Conv{dims}d``, or ``nn.ConvTranspose{dims}d``."""
    return (_CONV_TRANSPOSE if transposed else _CONV)[dims]


def standard_base(conv: nn.Module) -> type[nn.Module] | None:
    """The torch conv class ``conv`` is, or derives from (None for anything else)."""
    return next((c for c in type(conv).__mro__ if c in CONV_TYPES), None)


def runs_as_standard(conv: nn.Module) -> bool:
    """Whether ``conv`` is a torch conv (or a subclass) that computes what its standard class does."""
    cls, base = type(conv), standard_base(conv)
    return base is not None and cls.forward is base.forward and getattr(cls, "_conv_forward", None) is getattr(base, "_conv_forward", None)


_KEEP = object()


def plain_conv(conv: nn.Module, weight: Tensor, *, bias: Tensor | None = _KEEP, **options) -> nn.Module:
    """A standard conv of ``conv``'s kind and options holding ``weight`` and ``conv``'s bias, in its mode.

    ``bias`` and keyword ``options`` (padding, padding_mode, ...) replace ``conv``'s own.
    """
    base = standard_base(conv)
    bias = conv.bias if bias is _KEEP else bias
    options = dict(dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                        padding_mode=conv.padding_mode), **options)
    if conv.transposed:
        options.setdefault("output_padding", conv.output_padding)
    plain = base(conv.in_channels, conv.out_channels, conv.kernel_size, bias=bias is not None, device=weight.device,
                 dtype=weight.dtype, **options).train(conv.training)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
    plain.requires_grad_(any(p.requires_grad for p in conv.parameters()))
    return plain


def _tuple(v, dims: int) -> tuple:
    return (v,) * dims if isinstance(v, int) else tuple(v)


class SeparableConv(nn.Module):
    """A dense conv (1-, 2- or 3-d, plain or transposed) factored into a depthwise and a pointwise conv.

    ``order="dw-pw"`` runs ``depthwise`` then ``pointwise`` (MobileNet); ``order="pw-dw"``
    runs ``pointwise`` then ``depthwise`` (BSConv-U). Either way the spatial conv carries the
    original stride, padding, dilation, padding mode (and, transposed, output padding), and
    the last conv carries the bias, so the pair has the same input/output contract as the conv
    it replaces, ``output_size=`` included for a transposed one. Both halves are plain torch
    conv modules (the depthwise one transposed when the original was), so the pair exports to
    standard ONNX ``Conv`` / ``ConvTranspose`` nodes.

    The dense conv's hyper-parameters stay readable as attributes (``in_channels``,
    ``kernel_size``, ...) because surrounding code often reads them from the layer it calls.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, ...],
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        rank: int = 1,
        order: str = "dw-pw",
        dims: int | None = None,
        transposed: bool = False,
        output_padding: int | tuple[int, ...] = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        dims = dims or (2 if isinstance(kernel_size, int) else len(kernel_size))
        if dims not in _CONV:
            raise ValueError(f"convs of 1, 2 or 3 dimensions only, got {dims}")
        self.dims, self.transposed = dims, transposed
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = (_tuple(v, dims) for v in (kernel_size, stride, dilation))
        self.padding = padding if isinstance(padding, str) else _tuple(padding, dims)
        self.output_padding = _tuple(output_padding, dims)
        self.groups, self.padding_mode = groups, padding_mode
        self.rank, self.order = rank, order
        # Relative Frobenius error of the SVD factors against the dense weight they came from
        # (0.0 = exact); NaN for a pair built empty rather than from a dense conv.
        self.weight_error = float("nan")
        spatial_opts = dict(
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding, dilation=self.dilation,
            padding_mode=padding_mode, device=device, dtype=dtype,
        )
        if transposed:
            spatial_opts["output_padding"] = self.output_padding
        spatial, point = conv_class(dims, transposed), conv_class(dims)
        if order == "dw-pw":
            self.depthwise = spatial(in_channels, in_channels * rank, groups=in_channels, bias=False, **spatial_opts)
            self.pointwise = point(in_channels * rank, out_channels, 1, groups=groups, bias=bias, device=device, dtype=dtype)
        else:
            self.pointwise = point(in_channels, out_channels * rank, 1, groups=groups, bias=False, device=device, dtype=dtype)
            self.depthwise = spatial(out_channels * rank, out_channels, groups=out_channels, bias=bias, **spatial_opts)

    @property
    def last(self) -> nn.Module:
        """The conv that runs last: it holds the bias, and calibration and BatchNorm folding change it."""
        return self.pointwise if self.order == "dw-pw" else self.depthwise

    @property
    def bias(self) -> Tensor | None:
        """The pair's bias, held by whichever conv runs last."""
        return self.last.bias

    @property
    def weight(self) -> Tensor:
        """The dense weight this pair computes, in the dense conv's layout, recomputed on each read.

        Code written for the dense conv (``self.conv.weight.shape``, weight decay on it, a
        norm of it) keeps working; writing to it changes nothing. Reads are seen by
        :func:`watching_weight_reads`: code that applies this weight itself does not run the pair.
        """
        for reads in _WEIGHT_READS:
            reads.add(id(self))
        spatial, mixing = self.depthwise.weight, self.pointwise.weight
        return dense_weight(spatial, mixing, self.rank, self.groups, self.order, self.transposed)

    def forward(self, x: Tensor, output_size: list[int] | None = None) -> Tensor:
        spatial = (lambda t: self.depthwise(t, output_size)) if self.transposed else self.depthwise
        if self.order == "dw-pw":
            return self.pointwise(spatial(x))
        return spatial(self.pointwise(x))

    def extra_repr(self) -> str:
        kind = ", transposed" if self.transposed else ""
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, rank={self.rank}, order={self.order!r}{kind}"
        )

    @classmethod
    def from_conv(cls, conv: nn.Module, rank: int = 1, order: str = "dw-pw") -> "SeparableConv":
        """The rank-``rank`` separable pair closest to ``conv`` (any torch conv module), on its device and dtype.

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
            transposed=conv.transposed,
            output_padding=conv.output_padding,
        ).train(conv.training)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None,
        *,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | str = 0,
        dilation: int | tuple[int, ...] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
        rank: int = 1,
        order: str = "dw-pw",
        transposed: bool = False,
        output_padding: int | tuple[int, ...] = 0,
    ) -> "SeparableConv":
        """The separable pair for a conv given by its tensors (as in ``F.conv2d`` or ``F.conv_transpose2d``)."""
        factors = separable_factors(weight, rank, groups=groups, order=order, transposed=transposed)
        a, b, *k = weight.shape
        in_channels, out_channels = (a, b * groups) if transposed else (b * groups, a)
        module = cls(
            in_channels,
            out_channels,
            tuple(k),
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias is not None,
            padding_mode=padding_mode,
            rank=factors.rank,
            order=order,
            transposed=transposed,
            output_padding=output_padding,
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


SeparableConv2d = SeparableConv  # the name of the 2-d-only releases


class SamePadded(nn.Module):
    """A conv (padding 0) run on its input padded TensorFlow-"SAME" style, from the input's size at each call.

    The padding step of timm's ``Conv2dSame`` and its kind, kept apart from the conv so that
    the conv itself can be separated: for each spatial size i, stride s, kernel k and dilation
    d, ``max((ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)`` zeros, the odd one after.
    """

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation

    @staticmethod
    def padding_for(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> list[int]:
        """``F.pad``'s argument (last dimension first) for inputs of spatial ``size``."""
        pads: list[int] = []
        for i, k, s, d in reversed(list(zip(size, kernel, stride, dilation))):
            total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
            pads += [total // 2, total - total // 2]
        return pads

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-len(self.kernel_size):]
        return self.conv(F.pad(x, self.padding_for(size, self.kernel_size, self.stride, self.dilation)))


class BranchedSeparableConv(nn.Module):
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

    def __init__(self, pair: SeparableConv) -> None:
        super().__init__()
        if pair.groups != 1:
            raise ValueError("grouped pairs keep their form: their pointwise channels cannot be reordered across groups")
        if pair.transposed:
            raise ValueError("transposed pairs keep their form")
        dw, pw, r = pair.depthwise, pair.pointwise, pair.rank
        self.in_channels, self.out_channels, self.rank = pair.in_channels, pair.out_channels, r
        self.kernel_size, self.stride, self.padding = pair.kernel_size, pair.stride, pair.padding
        self.dilation, self.groups, self.order, self.dims = pair.dilation, pair.groups, pair.order, pair.dims
        self.weight_error = pair.weight_error
        width = pair.in_channels if pair.order == "dw-pw" else pair.out_channels  # channels of each branch
        options = dict(
            kernel_size=dw.kernel_size, stride=dw.stride, padding=dw.padding, dilation=dw.dilation,
            padding_mode=dw.padding_mode, device=dw.weight.device, dtype=dw.weight.dtype,
        )
        has_bias = pair.bias is not None
        self.branches = nn.ModuleList(
            conv_class(pair.dims)(width, width, groups=width, bias=has_bias and pair.order == "pw-dw" and i == 0, **options)
            for i in range(r)
        )
        pw_in, pw_out = pw.in_channels, pw.out_channels
        self.pointwise = conv_class(pair.dims)(
            pw_in, pw_out, 1, bias=has_bias and pair.order == "dw-pw", device=pw.weight.device, dtype=pw.weight.dtype,
        )
        # Channel (c, i) of the r per channel moves from c*r + i to i*width + c.
        order = torch.arange(width * r).reshape(width, r).t().reshape(-1)  # new channel j <- old order[j]
        with torch.no_grad():
            if pair.order == "dw-pw":
                for i, branch in enumerate(self.branches):
                    branch.weight.copy_(dw.weight[i::r])
                self.pointwise.weight.copy_(pw.weight[:, order])
            else:  # depthwise weight (N, r, *k): filter i of output n reads pointwise channel n*r + i
                for i, branch in enumerate(self.branches):
                    branch.weight.copy_(dw.weight[:, i : i + 1])
                self.pointwise.weight.copy_(pw.weight[order])
            if has_bias:
                self.bias.copy_(pair.bias)
        self.train(pair.training)

    @property
    def last(self) -> nn.Module | None:
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


class Conv1dAs2d(nn.Module):
    """A Conv1d run as a 1 x k Conv2d on its input seen as one row: the same function.

    onnxruntime's CPU kernels run a depthwise 1 x k Conv2d 1.2-3.4x faster than the same
    depthwise Conv1d (benchmarks/RESULTS.md, "1-d and 3-d"), so convtool ships the spatial
    half of 1-d pairs this way.
    """

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            conv.in_channels, conv.out_channels, (1, *conv.kernel_size), stride=(1, *conv.stride),
            padding=conv.padding if isinstance(conv.padding, str) else (0, *conv.padding), dilation=(1, *conv.dilation),
            groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.unsqueeze(2))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)
        self.train(conv.training)

    @property
    def weight(self) -> Tensor:
        """The weight in the Conv1d's shape."""
        return self.conv.weight.squeeze(2)

    @property
    def bias(self) -> Tensor | None:
        return self.conv.bias

    def forward(self, x: Tensor) -> Tensor:
        row = x.dim() - 1  # the dimension before the length, batched or not
        return self.conv(x.unsqueeze(row)).squeeze(row)


def runtime_forms(pair: SeparableConv, widths: set[int] | None = None) -> list[nn.Module]:
    """Every exact form convtool can ship ``pair`` in, the preferred last.

    As built; as multiplier-1 branches (ungrouped pairs of rank > 1, preferred except in 3-d);
    and either of those with
    its k x 1 depthwise kernels run as 1 x k, when ``widths`` (the widths of the inputs the
    pair's depthwise conv was called on) are all 1, or, for a 1-d pair, with its depthwise
    Conv1d run as a 1 x k Conv2d. New modules, except the pair itself.
    """
    forms: list[nn.Module] = [pair]
    # One input channel, depthwise first: the "depthwise" conv is a plain 1 -> r conv, no multiplier to undo.
    filterbank = pair.order == "dw-pw" and pair.in_channels == 1
    if pair.rank > 1 and pair.groups == 1 and not pair.transposed and not filterbank:
        # 3-d depthwise branches ran 1.15-5.0x slower than one channel-multiplier conv, in every
        # layer measured (benchmarks/RESULTS.md): there the pair as built stays preferred.
        branches = BranchedSeparableConv(pair)
        forms = [branches, pair] if pair.dims == 3 else [pair, branches]
    if pair.transposed:
        return forms
    if pair.dims == 2 and pair.kernel_size[0] > 1 and pair.kernel_size[1] == 1 and widths == {1}:
        forms += [_with_spatial(form, WidthOneConv2d) for form in forms]
    elif pair.dims == 1:
        forms += [_with_spatial(form, Conv1dAs2d) for form in forms]
    return forms


def _with_spatial(form: nn.Module, wrap: type[nn.Module]) -> nn.Module:
    """A copy of ``form`` whose depthwise conv(s) run wrapped in ``wrap``."""
    form = copy.deepcopy(form)
    if isinstance(form, BranchedSeparableConv):
        form.branches = nn.ModuleList(wrap(c) for c in form.branches)
    else:
        form.depthwise = wrap(form.depthwise)
    return form


def last_conv(module: nn.Module) -> nn.Module | None:
    """The conv that runs last in a dense conv (itself) or a pair; None for anything else."""
    if isinstance(module, (SeparableConv, BranchedSeparableConv)):
        return module.last if isinstance(module.last, CONV_TYPES) else None
    return module if isinstance(module, CONV_TYPES) else None
