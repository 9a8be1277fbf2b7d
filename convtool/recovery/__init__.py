"""Recovery: win back the accuracy a separation costs, from data or from the model alone.

``calibrate`` refits each pair's last conv by least squares (``equations``), ``both_halves``
refits both convs by alternating least squares, ``batches`` cuts calibration data, ``distill``
trains the separated model against the original, ``synthesize`` makes inputs from the
model's BatchNorm statistics, ``distributed`` runs any of them across processes.

Imports ``measure`` and ``core``.
"""
