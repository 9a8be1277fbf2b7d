"""Does an int8 file still give the fp32 model's answers, on data it was not calibrated on.

Int8 is lossy by design, so the file is judged as torchao judges lossy results: SQNR and the
share of top-1 answers kept, beside the worst absolute error (:func:`~convtool.measure.fidelity.output_fidelity`),
against the fp32 model it stands for, on held-out samples. It is run only where onnxruntime
really runs every node of it on the provider asked: a provider that lacks the quantized ops
would hand them to the CPU unseen, and a figure for it would be the CPU's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.inputs import eval_mode, model_device, tensors_of
from ..errors import InvalidOptionError, ProviderUnavailableError
from ..measure.fidelity import Fidelity, output_fidelity
from ..measure.onnxrt import open_session, require_provider
from .int8 import Int8Form, quantize_int8
from .int8_data import feeds_of


@dataclass(frozen=True)
class Int8Check:
    """An int8 file's outputs against its fp32 reference's, on held-out data.

    Attributes:
        path: the int8 file.
        reference: what it was compared with: the fp32 ONNX file's path, or ``"PyTorch model"``.
        provider: onnxruntime's name of the provider that ran the int8 file (every node of it).
        samples: the held-out samples compared.
        fidelity: SQNR, max-abs and relative error, cosine, and top-1 agreement where the
            model returns one batch of class logits, over all the samples.
    """

    path: str
    reference: str
    provider: str
    samples: int
    fidelity: Fidelity


def verify_int8(path: str | os.PathLike, reference: Any, held_out: Any, *, provider: str = "cpu") -> Int8Check:
    """Run the int8 file and its fp32 reference on ``held_out`` and compare their outputs.

    Args:
        path: the int8 ONNX file (:func:`~convtool.deploy.int8.quantize_int8`'s).
        reference: the fp32 model it stands for: an ONNX file (run on onnxruntime CPU) or the
            ``nn.Module`` (run in eval mode; its outputs in the order ONNX flattens them).
        held_out: samples it was not calibrated on, in any form calibration takes (an array or
            tensor with N first, a tuple or dict of them, or a list of batches).
        provider: where the int8 file runs: a short or full onnxruntime name.

    Returns:
        An :class:`Int8Check`; it reports, it does not judge: floors are the caller's.

    Raises:
        ProviderUnavailableError: the provider is not in this build, or cannot run every node
            of the int8 file (its quantized ops), or onnxruntime fell back to the CPU.
        InvalidOptionError: held-out data that does not fit the model (one line, what to give).

    Example:
        >>> check = verify_int8("model.int8.onnx", "model.onnx", images[-64:])
        >>> check.fidelity.sqnr_db > 20, check.fidelity.top1_agreement
        (True, 0.984375)
    """
    import onnx

    name = require_provider(provider)
    session = open_session(path, name, strict=True)
    if session.get_providers()[0] != name:
        raise ProviderUnavailableError(f"cannot run the int8 file on {provider!r}: onnxruntime fell back to the CPU")
    feeds, samples = feeds_of(onnx.load(str(path), load_external_data=False), held_out, what="held-out data")
    outputs = [session.run(None, feed) for feed in feeds]
    if isinstance(reference, nn.Module):
        expected, described = _torch_outputs(reference, feeds, [i.name for i in session.get_inputs()]), "PyTorch model"
    else:
        fp32 = open_session(reference, "CPUExecutionProvider", lean=True)
        expected, described = [fp32.run(None, feed) for feed in feeds], str(reference)
    actual, wanted = _joined(outputs), _joined(expected)
    if len(actual) != len(wanted):
        raise InvalidOptionError(f"the int8 file returns {len(actual)} outputs and its reference {len(wanted)}: "
                                 f"compare it with the fp32 model it was quantized from")
    return Int8Check(str(path), described, name, samples, output_fidelity(actual, wanted))


def int8_outputs(fp32: str | os.PathLike, calibration: Any, batches: list[Any], out: str | os.PathLike, *,
                 form: Int8Form | None = None) -> list[list[np.ndarray]]:
    """The fp32 file quantized to ``out`` on ``calibration``, and its outputs on each of ``batches`` (onnxruntime CPU).

    What a search judges with int8: the file a separation ships as, not its fp32 model, so an
    agreement floor holds for the int8 file. ``batches``: each a batch as calibration takes one.
    """
    import onnx

    quantized = quantize_int8(fp32, calibration, out, form=form, min_samples=1)
    session = open_session(quantized.path, "CPUExecutionProvider", lean=True)
    proto = onnx.load(quantized.path, load_external_data=False)
    rows = []
    for batch in batches:
        (feed,), _ = feeds_of(proto, [batch], what="held-out data")
        rows.append(session.run(None, feed))
    return rows


def _torch_outputs(model: nn.Module, feeds: list[dict], names: list[str]) -> list[list[np.ndarray]]:
    """The PyTorch model's outputs on each batch, flattened as ONNX flattens them."""
    device = model_device(model)
    rows = []
    with torch.no_grad(), eval_mode(model):
        for feed in feeds:
            out = model(*(torch.from_numpy(np.ascontiguousarray(feed[n])).to(device) for n in names))
            rows.append([t.detach().cpu().numpy() for t in tensors_of((out,))])
    return rows


def _joined(rows: list[list[np.ndarray]]) -> list[torch.Tensor]:
    """Each output over all batches: joined along the batch dimension, stacked where it has none."""
    joined = []
    for parts in zip(*rows):
        tensors = [torch.from_numpy(np.asarray(p)) for p in parts]
        batched = all(t.dim() and t.shape[1:] == tensors[0].shape[1:] for t in tensors)
        joined.append(torch.cat(tensors) if batched else torch.stack(tensors))
    return joined
