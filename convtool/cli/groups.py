"""Option groups shared by commands, each set as the library's keyword arguments are grouped.

A group is a list of click options and a function that turns their values into what the
library takes; the command receives the result under the group's name (as onnxslim turns its
option dataclasses into flags). One flag sets one thing: each budget flag makes its budget,
``--latency`` names the provider time is measured on, ``--order`` the order.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import click

from ..errors import InvalidOptionError


def group(name: str, options: list[tuple[str, Callable]], build: Callable[..., Any]) -> Callable:
    """A decorator adding ``options`` (each a parameter name and its ``click.option``) to a command, which
    receives ``build(**their values)`` as keyword ``name``."""

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {param: kwargs.pop(param) for param, _ in options}
            kwargs[name] = build(**values)
            return func(*args, **kwargs)

        for _, option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


BUDGET_FLAGS = ("--rank", "--flops-target", "--energy", "--min-agreement / --min-sqnr", "--latency-target")


def ranks_from(rank: str | None, flops_target: float | None, energy: float | None, min_agreement: float | None,
               min_sqnr: float | None, agreement: str | None, minimize: str, latency_target: float | None, sensitivity: bool | None,
               latency_provider: str | None, allow_slower: bool) -> dict:
    """The library's ``rank``, ``latency_provider`` and ``allow_slower`` from the flags; one budget flag at a time.

    ``--rank auto`` alone asks for a quarter of the FLOPs; beside a budget flag it adds nothing.
    An agreement floor with a latency target is one budget: the fastest model keeping the floor,
    within that latency.
    """
    from ..plan.agreement import AgreementTarget
    from ..plan.budgets import Energy, FlopsTarget
    from ..plan.latency import LatencyTarget

    fixed = rank if rank not in (None, "auto") else None
    floor = min_agreement is not None or min_sqnr is not None
    given = [flag for flag, value in zip(BUDGET_FLAGS, (fixed, flops_target, energy, min_agreement if min_agreement is not None
                                                         else min_sqnr, None if floor else latency_target)) if value is not None]
    if len(given) > 1:
        raise InvalidOptionError(f"{' and '.join(given)} each choose the ranks: give one")
    if sensitivity is not None and (fixed is not None or energy is not None or (rank is None and not given and latency_target is None)):
        raise InvalidOptionError("--sensitivity weighs the layers of a budget: use it with --flops-target, --min-agreement / "
                                 "--min-sqnr or --latency-target")
    if (agreement is not None or minimize != "latency") and not floor:
        raise InvalidOptionError("--agreement and --minimize say what an agreement floor keeps and saves: use them with "
                                 "--min-agreement / --min-sqnr")
    if floor:
        measure = _agreement_measure(agreement) if agreement else None
        budget: Any = AgreementTarget(min_agreement, min_sqnr, sensitivity, minimize=minimize, latency=latency_target,
                                      agreement=measure)
    elif latency_target is not None:
        budget = LatencyTarget(latency_target, provider=latency_provider or "cpu", sensitivity=sensitivity)
    elif flops_target is not None or rank == "auto":
        budget = FlopsTarget(flops_target if flops_target is not None else 0.25, sensitivity)
    elif energy is not None:
        budget = Energy(energy)
    else:
        budget = _fixed_rank(fixed)
    return dict(rank=budget, latency_provider=latency_provider, allow_slower=allow_slower)


def _agreement_measure(spec: str):
    from ..io import resolve_arch

    return resolve_arch(spec, "--agreement")


def _fixed_rank(text: str | None) -> int | str:
    if text is None:
        return 1
    if text == "full":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InvalidOptionError(f"--rank {text!r} should be a positive integer, 'full' or 'auto'")
    return value


ranks = group("ranks", [
    ("rank", click.option("--rank", help="Separable filters per channel everywhere: a positive integer or 'full' (exact) [1]; "
                                          "'auto' alone: --flops-target 0.25.")),
    ("flops_target", click.option("--flops-target", type=float, metavar="F",
                                  help="The model's FLOPs after, as a fraction of before (e.g. 0.25), spent where the error costs least.")),
    ("energy", click.option("--energy", type=float, metavar="S",
                            help="Per layer, the smallest rank keeping this share of spectral energy (e.g. 0.9).")),
    ("min_agreement", click.option("--min-agreement", type=float, metavar="SHARE",
                                   help="With --calibration: the fewest FLOPs whose top-1 agreement with the original on a held-out "
                                        "quarter of the calibration data is at least SHARE (e.g. 0.99; classifiers).")),
    ("min_sqnr", click.option("--min-sqnr", type=float, metavar="DB",
                              help="With --calibration: the fastest model whose output SQNR against the original on a held-out "
                                   "quarter of the calibration data is at least DB (any output).")),
    ("agreement", click.option("--agreement", metavar="MODULE:FN",
                               help="What --min-agreement measures for your task: fn(reference_outputs, outputs) -> share of "
                                    "samples kept (strings read alike, decisions kept) [top-1 agreement].")),
    ("minimize", click.option("--minimize", type=click.Choice(["latency", "flops"]), default="latency", show_default=True,
                              help="What --min-agreement / --min-sqnr save: measured latency on --latency, or FLOPs.")),
    ("latency_target", click.option("--latency-target", type=float, metavar="F",
                                    help="The separated model's latency on onnxruntime (--latency, cpu by default) as a fraction "
                                         "of the original's, measured end to end (e.g. 0.5); with --int8, of the dense int8 "
                                         "model's, both quantized; with --min-agreement, a cap on it.")),
    ("sensitivity", click.option("--sensitivity/--no-sensitivity", default=None,
                                 help="A budget's layers weighed by their measured effect on the model's output (the default "
                                      "with --calibration), or by their own output's error.")),
    ("latency_provider", click.option("--latency", "latency_provider", metavar="PROVIDER",
                                      help="The onnxruntime provider time is measured on [cpu]: a budget's layers whose separated "
                                           "form is not faster there stay dense (an explicit --rank only when this is given), "
                                           "and --latency-target is timed there.")),
    ("allow_slower", click.option("--allow-slower", is_flag=True,
                                  help="Keep a budget's layers whose separated form is not faster than the dense conv.")),
], ranks_from)


scope = group("scope", [
    ("include", click.option("--include", multiple=True, metavar="GLOB",
                             help="Separate only convs whose qualified name matches; repeatable.")),
    ("exclude", click.option("--exclude", multiple=True, metavar="GLOB", help="Leave convs whose qualified name matches dense; repeatable.")),
    ("order", click.option("--order", type=click.Choice(["dw-pw", "pw-dw", "auto"]), default="dw-pw", show_default=True,
                           help="Depthwise then pointwise (MobileNet), pointwise then depthwise (BSConv-U), or per layer the better.")),
], lambda include, exclude, order: dict(include=include, exclude=exclude, order=order))
