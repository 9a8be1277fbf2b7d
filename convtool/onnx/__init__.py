"""The ONNX front end: separate the convs of an ONNX graph without PyTorch's model code.

Reads and writes ``.onnx`` files (``files``), counts their FLOPs and parameters (``counts``),
rewrites each ``Conv`` node into a depthwise + pointwise pair (``separate``, graph surgery in
``graph``), and refits each pair's last conv on data through onnxruntime (``refit``).

Imports ``plan``, ``recovery``, ``measure`` and ``core``; never the PyTorch front end.
"""
