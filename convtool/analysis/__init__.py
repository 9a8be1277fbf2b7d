"""Analysis: parameters and FLOPs, output fidelity, onnxruntime checks, reports."""
