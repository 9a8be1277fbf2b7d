"""onnxruntime sessions for timing (``convtool.measure.onnxrt``)."""

import torch
from torch import nn

import convtool
from convtool.measure.onnxrt import timing_session


def test_a_timing_session_s_threads_do_not_spin_between_runs(tmp_path):
    """Each session owns its intra-op threads; spinning after a run, they take the cores from the next session timed
    round-robin beside it (issue 37's pitch row: 3-7x slower interleaved than alone)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3)).eval()
    path = convtool.export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx").path
    session = timing_session(path, "CPUExecutionProvider", threads=2)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
