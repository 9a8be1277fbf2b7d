"""The planner: which convs to separate, at which rank and order, shared by both front ends.

``site`` describes a dense conv weight and its uses (each front end builds them), ``ranks``
turns the ``rank`` option (an int, ``"full"``, ``FlopsTarget``, ``Energy``) into a pick per
site, ``knapsack`` spends a FLOP budget.

Imports ``recovery`` (the refit that scores ranks on data), ``measure`` and ``core``.
"""
