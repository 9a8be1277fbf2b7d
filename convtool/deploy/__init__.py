"""Shipping a model: the runtime form (BatchNorm folded, pair layouts), ONNX export, verification.

Imports ``convtool.core`` and ``convtool.measure``; independent of the front ends (``convtool.pytorch``, ``convtool.onnx``) and ``convtool.recovery``.
"""
