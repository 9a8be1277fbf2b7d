"""Shipping a model: the runtime form (BatchNorm folded, pair layouts), ONNX export, verification.

Imports ``convtool.core`` and ``convtool.measure``; independent of ``convtool.convert``.
"""
