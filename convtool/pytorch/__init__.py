"""The PyTorch front end: separate the convs of an ``nn.Module`` and prove the result runs.

``separate.py`` calls, in order: ``bake`` (make computed weights plain), ``sites`` with
``fx_pass`` (find every conv weight and its uses), the planner (``convtool.plan``),
``install`` (put the pairs in place), ``proof`` (run the model: each pair ran, no replaced conv
did), recovery's refit (``convtool.recovery``), and ``measure.layers`` (describe each layer).

Imports ``plan``, ``recovery``, ``measure`` and ``core``; never the ONNX front end, ``deploy``,
``report`` or the CLI.
"""
