"""The planner: which convs to separate, at which rank and order, shared by both front ends.

``site`` describes a dense conv weight and its uses (each front end builds them); ``ranks`` and
``measured`` cost a site's candidate ranks (FLOPs, weight and output errors); ``costing`` holds
every layer's options measured once, in FLOPs and, when timed, milliseconds, from what a front
end measures of its dense model; ``budget`` is the protocol every budget follows and
``budgets``, ``agreement`` and ``latency`` the budgets themselves, each planning from a costing
and searching over trials; ``knapsack`` spends a budget.

Imports ``recovery`` (the refit that scores ranks on data), ``measure`` and ``core``.
"""
