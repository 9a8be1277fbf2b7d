"""What the dense working copy does, measured before it changes: which weights ran, pixels per
site, the model's FLOPs, the conv calls of the first calibration batch (planner and refit share
them), the model's output with one weight swapped, and each layer's forms timed as they ship:
the PyTorch front end's :class:`~convtool.plan.costing.DenseView`."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..core.inputs import running
from ..core.modules import runtime_forms
from ..core.names import join
from ..deploy.int8 import Int8Form
from ..deploy.int8_latency import int8_module_latency, int8_session
from ..errors import AnalysisError, InvalidOptionError
from ..measure.conv_calls import ConvCall, ConvRecorder, explicit_padding, record
from ..measure.counts import analyze
from ..measure.onnxrt import module_latency, module_session, paired_latencies, timing_session
from ..measure.sensitivity import OutputError
from ..plan.knapsack import DENSE
from ..plan.measured import Sensitivity, dense_for, pair_for
from ..plan.ranks import Key, SiteStats
from ..plan.site import Site
from .proof import NOT_RUN, OUTSIDE, RAN


def dense_behaviour(original: nn.Module, sites: list[Site], run: ConvRecorder) -> dict[str, str]:
    """Per site, what the dense working copy did with its weight: ran it, did not, or ran the caller's own.

    A deep copy does not copy what closures capture, so a conv reached through one runs the
    caller's module even in the copy: its weight is then one of the caller's parameters.
    """
    used = run.by_weight()
    callers = {id(p): name for name, p in original.named_parameters(remove_duplicate=False)}
    outside = {callers[i] for i in used if i in callers}
    behaviour = {}
    for site in sites:
        weight_names = [join(n, "weight") for use in site.uses for n in use.names] or [site.name]
        if id(site.weight) in used:
            behaviour[site.name] = RAN
        elif outside.intersection(weight_names):
            behaviour[site.name] = OUTSIDE
        else:
            behaviour[site.name] = NOT_RUN
    return behaviour


def site_stats(sites: list[Site], run: ConvRecorder) -> dict[str, SiteStats]:
    """Pixels each site's weight processed, with the input as the layer receives it.

    A conv with a padding mode other than zeros pads its input before calling conv2d, so the
    recorder saw the padded size; the pair's pointwise (``"pw-dw"``) runs on the unpadded one.
    """
    by_weight = run.by_weight()
    stats = {}
    for site in sites:
        calls = by_weight.get(id(site.weight))
        if not calls:
            continue
        o, dims = site.options, site.weight.dim() - 2
        pad = (0,) * (2 * dims)
        if o.get("padding_mode", "zeros") != "zeros":
            pad = explicit_padding(o["padding"], tuple(site.weight.shape[2:]), o["dilation"])
        # F.pad's order is last dimension first: spatial dimension -j loses pad[2j-2] + pad[2j-1].
        shapes = [(*s[:-dims], *(s[-j] - pad[2 * j - 2] - pad[2 * j - 1] for j in range(dims, 0, -1)))
                  for s in (c.input_shape for c in calls)]
        in_pixels = sum((s[0] if len(s) == dims + 2 else 1) * math.prod(s[-dims:]) for s in shapes)
        stats[site.name] = SiteStats(in_pixels, sum(c.out_pixels for c in calls), tuple(shapes[0]))
    return stats


def model_flops(model: nn.Module, inputs: tuple, run: ConvRecorder) -> float:
    """fvcore's count for the whole model; its convs alone where fvcore cannot trace it."""
    convs = float(sum(c.flops for c in run.calls))
    try:
        return float(max(analyze(model, inputs).flops, convs))
    except AnalysisError:
        return convs


class FirstBatch:
    """The dense model's conv calls on the first calibration batch, recorded at most once.

    The planner asks for sites' inputs and outputs to cost ranks on; the refit then takes the
    same outputs as that batch's targets instead of running the dense model on it again.
    """

    def __init__(self, model: nn.Module, sites: list[Site], batch: tuple) -> None:
        self.model, self.sites, self.batch = model, sites, batch
        self.calls: dict[int, list[ConvCall]] | None = None

    def __call__(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self.calls is None:
            self.calls = record(self.model, self.batch, keep={id(s.weight) for s in self.sites}).by_weight()
        return {s.name: (calls[0].input, calls[0].output) for s in self.sites
                if s.name in names and (calls := self.calls.get(id(s.weight)))}

    def drop_inputs(self) -> None:
        """Free the inputs once planned: only the outputs serve the refit."""
        for calls in (self.calls or {}).values():
            for call in calls:
                call.input = None

    def outputs(self, memo: dict[int, torch.Tensor]) -> dict[int, list[torch.Tensor]] | None:
        """The recorded outputs keyed as the refit's reference knows its weights (``memo``: id -> copy), if recorded.

        Handed over, not kept: the refit lets go of them after the first batch.
        """
        calls, self.calls = self.calls, None
        if calls is None:
            return None
        return {id(memo[key]): [c.output for c in group] for key, group in calls.items() if key in memo}


class DenseModel:
    """The dense working copy as the planner sees it; each measure is made once, when first asked.

    ``costed``: the inputs FLOPs and latency are measured on (``what`` says what they are, for
    errors); ``batch``: the first calibration batch, or None; ``provider``: where layers are
    timed (onnxruntime's name), or None; ``int8``: the form layers are quantized in before they
    are timed (None: timed in fp32).
    """

    def __init__(self, work: nn.Module, sites: list[Site], costed: tuple, what: str, batch: tuple | None,
                 provider: str | None, int8: Int8Form | None = None) -> None:
        self.work, self.sites, self.costed, self.what, self.provider = work, sites, costed, what, provider
        self.int8 = int8
        self.precision = "fp32" if int8 is None else "int8"
        self.first = FirstBatch(work, sites, batch) if batch is not None else None
        self._run: ConvRecorder | None = None
        self._stats: dict[str, SiteStats] | None = None

    def run(self) -> ConvRecorder:
        """The dense model's conv calls on the costed inputs."""
        if self._run is None:
            if not self.costed:
                raise InvalidOptionError("a budget or a latency provider needs example inputs (or calibration data) to cost each layer")
            with running(self.costed, self.what):
                self._run = record(self.work, self.costed)
        return self._run

    @property
    def recorded(self) -> ConvRecorder | None:
        """The dense run on the costed inputs, if the planner asked for it (the proof reuses it)."""
        return self._run

    def stats(self) -> dict[str, SiteStats]:
        if self._stats is None:
            self._stats = site_stats(self.sites, self.run())
        return self._stats

    def uncosted(self) -> dict[str, str]:
        return {s.name: "did not run on the example inputs, so its cost is unknown" for s in self.sites if s.name not in self.stats()}

    def flops(self) -> float:
        return model_flops(self.work, self.costed, self.run())

    def activations(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self.first(names) if self.first is not None else {}

    def model_error(self) -> Sensitivity | None:
        if self.first is None:
            return None
        try:
            return OutputError(self.work, self.first.batch)
        except ValueError:
            raise InvalidOptionError("sensitivity needs a model with a float output to compare") from None

    def latency(self, site: Site, key: Key, stats: SiteStats) -> float:
        """A dense conv as it is, a pair in the form ``export_onnx`` ships it in (its preferred runtime form);
        with int8, each quantized and timed with 8-bit edges, as it runs inside the int8 file."""
        shape = stats.input_shape
        module = _shipped(site, key, shape)
        if self.int8 is not None:
            return int8_module_latency(module, shape, self.provider, form=self.int8)
        return module_latency(module, shape, self.provider)

    def paired(self, site: Site, keys: list[Key], stats: SiteStats) -> list[float]:
        """:meth:`latency` of each of ``keys``, timed side by side, round-robin (not cached)."""
        with tempfile.TemporaryDirectory(prefix="convtool-paired-") as tmp:
            timed = []
            for i, key in enumerate(keys):
                folder = Path(tmp) / str(i)
                folder.mkdir()
                path, feeds = module_session(_shipped(site, key, stats.input_shape), stats.input_shape, folder)
                timed.append(int8_session(path, feeds, self.provider, self.int8, folder) if self.int8 is not None
                             else (timing_session(path, self.provider), feeds))
            return paired_latencies(timed)


def _shipped(site: Site, key: Key, shape: tuple[int, ...]) -> nn.Module:
    """The dense conv, or the pair in the form ``export_onnx`` ships it in at this input (its preferred runtime form)."""
    module = dense_for(site) if key == DENSE else runtime_forms(pair_for(site, *key), {shape[-1]})[-1]
    return module.eval()
