"""Measuring models: fvcore counts, conv calls, output fidelity, torch -> ONNX writing and onnxruntime timing.

ONNX graphs themselves (reading, counting, rewriting) are the ONNX front end's, in ``convtool.onnx``.

Imports only ``convtool.core`` and ``convtool.errors``.
"""
