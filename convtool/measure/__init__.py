"""Measuring models: fvcore counts, conv calls, output fidelity, ONNX files and onnxruntime timing.

Imports only ``convtool.core`` and ``convtool.errors``.
"""
