"""Every separation goes through here: a budget searched on a front end, and the public entry points.

``separate`` (an ``nn.Module``) and ``separate_onnx`` (an ONNX graph) turn ``rank`` into a
budget and hand it the trials of its front end (``trials``): a plain budget takes one, a target
met by measurement (an agreement floor, a latency target) several, each judged on held-out
calibration data or timed end to end, all sharing one costing. ``fronts`` adapts each front end
to what the trials ask; ``sweep`` tries several FLOP budgets and times them side by side.

Imports the two front ends and everything below them; never ``report``, ``io`` or the CLI.
"""
