"""A zoo of forms: the ways real code reaches a conv, each in a model small enough for milliseconds.

``tests/zoo.py`` covers architectures; this zoo covers how a forward gets to its convs: through
plain Python lists, dicts and tuples, through closures and bound methods convtool cannot
rewire, as chained or repeated ``F.conv2d`` calls, through tied weights, dict and multiple
inputs, hooks, weight parametrizations, every float dtype, and conv subclasses.

Each :class:`Form` says what a rank-1 separation must report: the layers (by name), their
aliases and call counts where they matter, and the convs that must stay dense with a word of
their reason. Weights are random (default init), so no separated layer is exactly rank 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations


def conv(cin: int, cout: int, k: int = 3, stride: int = 1, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, k // 2, **kwargs)


class TwoConvs(nn.Module):
    """The base of most forms: ``a`` (4 -> 8) then ``b`` (8 -> 8), both 3x3."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv(4, 8)
        self.b = conv(8, 8)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


# 1-2. Convs reached through plain Python containers held as attributes.


class ListStages(TwoConvs):
    def __init__(self) -> None:
        super().__init__()
        self.stages = [self.a, self.b]

    def forward(self, x):
        for stage in self.stages:
            x = F.relu(stage(x))
        return x


class ListOfBlocks(nn.Module):
    """A list in a child module, holding a Sequential (whose conv is replaced inside it) and a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Module()
        self.body.first = nn.Sequential(conv(4, 8), nn.ReLU())
        self.body.second = conv(8, 8)
        self.body.order = [self.body.first, self.body.second]

    def forward(self, x):
        for block in self.body.order:
            x = block(x)
        return x


class DictAttr(TwoConvs):
    def __init__(self) -> None:
        super().__init__()
        self.by_name = {"x": self.a, "y": self.b}

    def forward(self, x):
        return self.by_name["y"](F.relu(self.by_name["x"](x)))


class TupleAttr(TwoConvs):
    def __init__(self) -> None:
        super().__init__()
        self.pair = (self.a, self.b)

    def forward(self, x):
        first, second = self.pair
        return second(F.relu(first(x)))


# 3. Convs captured in closures (rewired through their cells, since the copy copies closures),
#    and where convtool cannot rewire them: those must stay dense, reported.


class ClosureConv(nn.Module):
    """``c`` reached only through a lambda closing over it; ``a`` is an ordinary conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv(4, 8)
        self.c = conv(8, 8)
        captured = self.c
        self.apply_c = lambda x: captured(x)

    def forward(self, x):
        return self.apply_c(F.relu(self.a(x)))


class ClosureSetattr(ClosureConv):
    """The same closure stored past ``nn.Module.__setattr__``."""

    def __init__(self) -> None:
        super().__init__()
        captured = self.c
        object.__setattr__(self, "apply_c", lambda x: F.relu(captured(x)))


class PartialConv(ClosureConv):
    """A ``functools.partial`` holding the conv: deep-copied with the model, then still dense."""

    def __init__(self) -> None:
        super().__init__()
        self.apply_c = functools.partial(nn.Conv2d.forward, self.c)


class BoundMethodConv(ClosureConv):
    """The conv's bound ``forward`` kept as an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.apply_c = self.c.forward


class Holder:
    """A plain Python object (not a module, list or closure) holding a conv."""

    def __init__(self, conv: nn.Module) -> None:
        self.conv = conv


class SlotsHolder:
    """An object with ``__slots__``: it has no ``__dict__`` for convtool to follow."""

    __slots__ = ("conv",)

    def __init__(self, conv: nn.Module) -> None:
        self.conv = conv


class HolderConv(ClosureConv):
    """``c`` run through a plain object: fx sees a call of ``c``, but replacing ``self.c`` misses it."""

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "apply_c", None)
        self.holder = Holder(self.c)

    def forward(self, x):
        return self.holder.conv(F.relu(self.a(x)))


class SlotsHolderConv(HolderConv):
    """``c`` run through an object convtool cannot rewire: it must stay dense, with the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.holder = SlotsHolder(self.c)


# 4. Functional convs on parameters.


class FunctionalChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 4, 3, 3) * 0.2)
        self.w2 = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)

    def forward(self, x):
        return F.conv2d(F.conv2d(x, self.w1, padding=1), self.w2, padding=1)


class FunctionalTwice(nn.Module):
    """One weight applied twice in a row, with the same setting: one pair called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)

    def forward(self, x):
        return F.conv2d(F.conv2d(x, self.w, padding=1), self.w, padding=1)


class FunctionalDilations(nn.Module):
    """One weight at two dilations: one layer, two pairs sharing their factors."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)
        self.b = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=1) + torch.conv2d(x, self.w, None, 1, 2, 2, 1)


# 5. Tied weights: two conv modules, one weight tensor.


class TiedWeights(nn.Module):
    def __init__(self, stride: int = 1) -> None:
        super().__init__()
        self.a = conv(8, 8)
        self.b = conv(8, 8, stride=stride)
        self.b.weight = self.a.weight  # each keeps its own bias

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


# 6. Inputs other than one tensor.


class DictInput(TwoConvs):
    def forward(self, d):
        return self.b(F.relu(self.a(d["image"]))) * d["scale"]


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left = conv(4, 8)
        self.right = conv(2, 8, 5)
        self.fuse = conv(16, 8)

    def forward(self, image, depth):
        return self.fuse(torch.cat([F.relu(self.left(image)), F.relu(self.right(depth))], 1))


# 7. Hooks.


def _halve(module, args, output):
    return output * 0.5


def _scale_input(module, args):
    return (args[0] * 2.0,)


class HookedConvs(nn.Module):
    """``b`` has a forward hook and ``c`` a forward pre-hook, both changing the maths: they stay dense."""

    def __init__(self) -> None:
        super().__init__()
        self.a = conv(4, 8)
        self.b = conv(8, 8)
        self.c = conv(8, 8)
        self.b.register_forward_hook(_halve)
        self.c.register_forward_pre_hook(_scale_input)

    def forward(self, x):
        return self.c(F.relu(self.b(F.relu(self.a(x)))))


def _count_and_halve(module, args, output):
    module.hook_calls += 1
    return output * 0.5


class HookedParent(nn.Module):
    """A forward hook on the container holding the convs: the convs are separated, the hook keeps running."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(conv(4, 8), nn.ReLU(), conv(8, 8))
        self.block.hook_calls = 0
        self.block.register_forward_hook(_count_and_halve)

    def forward(self, x):
        return F.relu(self.block(x))


# 8. Weights computed by parametrizations or the old norm hooks.


def normed(kind: str) -> nn.Module:
    """TwoConvs with ``a`` under a weight parametrization (``b`` stays plain)."""
    model = TwoConvs()
    if kind == "weight_norm":
        parametrizations.weight_norm(model.a)
    elif kind == "spectral_norm":
        parametrizations.spectral_norm(model.a)
    elif kind == "old_weight_norm":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of parametrizations
            nn.utils.weight_norm(model.a)
    else:
        raise ValueError(kind)
    return model


# 9. Dtypes: a module conv and a functional conv, cast as a whole.


class ModuleAndFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = conv(4, 8)
        self.w = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.2)

    def forward(self, x):
        return F.conv2d(F.relu(self.a(x)), self.w, padding=1)


# 10. Conv subclasses.


class LabeledConv(nn.Conv2d):
    """Only adds attributes: the maths is Conv2d's."""

    def __init__(self, *args, label: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.label = label
        self.tags = {"role": "stem"}


class ScaledConv(nn.Conv2d):
    """Overrides forward: its maths is not Conv2d's."""

    def forward(self, x):
        return super().forward(x) * 0.5


class Subclasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.labeled = LabeledConv(4, 8, 3, padding=1, label="stem")
        self.scaled = ScaledConv(8, 8, 3, padding=1)

    def forward(self, x):
        return self.scaled(F.relu(self.labeled(x)))


@dataclass(frozen=True)
class Form:
    """One form, and what a rank-1 separation of it must report.

    Attributes:
        layers: the names of ``Separation.layers``, in any order.
        skipped: convs that must stay dense, each with a word of its reason.
        aliases: per layer, names that must be among its aliases.
        calls: per layer, how many times its pairs run on the example inputs.
        computed: layers whose dense weight is recomputed on every access (parametrized), so
            it has no stable identity to look for in the separated model's conv calls.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    layers: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    computed: tuple[str, ...] = ()
    dtype: torch.dtype = torch.float32
    train: bool = False


def _img(c: int = 4, s: int = 12, n: int = 2) -> Callable[[], tuple]:
    return lambda: (torch.randn(n, c, s, s),)


FORMS: list[Form] = [
    Form("list_attr", ListStages, _img(), ("a", "b")),
    Form("list_in_child", ListOfBlocks, _img(), ("body.first.0", "body.second")),
    Form("dict_attr", DictAttr, _img(), ("a", "b")),
    Form("tuple_attr", TupleAttr, _img(), ("a", "b")),
    Form("closure", ClosureConv, _img(), ("a", "c")),
    Form("closure_setattr", ClosureSetattr, _img(), ("a", "c")),
    Form("holder", HolderConv, _img(), ("a", "c")),
    Form("slots_holder", SlotsHolderConv, _img(), ("a",), {"c": "without going through the module"}),
    # fx inlines a partial or bound forward into F.conv2d on c.weight: the weight is read directly.
    Form("closure_partial", PartialConv, _img(), ("a",), {"c": "directly"}),
    Form("bound_method", BoundMethodConv, _img(), ("a",), {"c": "directly"}),
    Form("functional_chain", FunctionalChain, _img(), ("w1", "w2"), calls={"w1": 1, "w2": 1}),
    Form("functional_twice", FunctionalTwice, _img(8), ("w",), aliases={"w": ()}, calls={"w": 2}),
    Form("functional_dilations", FunctionalDilations, _img(8), ("w",), calls={"w": 2}),
    Form("tied", TiedWeights, _img(8), ("a",), aliases={"a": ("b",)}, calls={"a": 2}),
    Form("tied_stride", functools.partial(TiedWeights, stride=2), _img(8), ("a",), aliases={"a": ("b",)}, calls={"a": 2}),
    Form("dict_input", DictInput, lambda: ({"image": torch.randn(2, 4, 12, 12), "scale": torch.tensor(1.5)},), ("a", "b")),
    Form("two_inputs", TwoInputs, lambda: (torch.randn(2, 4, 12, 12), torch.randn(2, 2, 12, 12)), ("left", "right", "fuse")),
    Form("hooked_conv", HookedConvs, _img(), ("a",), {"b": "hooks", "c": "hooks"}),
    Form("hooked_parent", HookedParent, _img(), ("block.0", "block.2")),
    Form("weight_norm", functools.partial(normed, "weight_norm"), _img(), ("a", "b"), computed=("a",)),
    Form("weight_norm_train", functools.partial(normed, "weight_norm"), _img(), ("a", "b"), computed=("a",), train=True),
    Form("spectral_norm", functools.partial(normed, "spectral_norm"), _img(), ("a", "b"), computed=("a",)),
    Form("spectral_norm_train", functools.partial(normed, "spectral_norm"), _img(), ("a", "b"), computed=("a",), train=True),
    Form("old_weight_norm", functools.partial(normed, "old_weight_norm"), _img(), ("a", "b"), computed=("a",)),
    Form("old_weight_norm_train", functools.partial(normed, "old_weight_norm"), _img(), ("a", "b"), computed=("a",), train=True),
    *[
        Form(f"dtype_{str(dtype).removeprefix('torch.')}", ModuleAndFunctional, _img(), ("a", "w"), dtype=dtype)
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    ],
    Form("subclasses", Subclasses, _img(), ("labeled",), {"scaled": "overrides"}),
    Form("bare_conv", functools.partial(conv, 4, 8), _img(), ("<model>",)),
]


def build_form(form: Form, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The form's model (seeded, in its dtype and train/eval mode) and its example inputs."""
    torch.manual_seed(seed)
    model = form.build().to(form.dtype).train(form.train)
    inputs = torch.utils._pytree.tree_map(
        lambda x: x.to(form.dtype) if isinstance(x, torch.Tensor) else x, form.inputs()
    )
    return model, inputs
