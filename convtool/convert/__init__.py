"""Conversion: the decomposition math, the separable module, the fx pass, ONNX export."""
