"""The bottom layer: SVD math, the separable modules, the records, input and naming helpers,
and the working copy every entry point makes of the caller's model.

Nothing here imports from the layers above (measure, recovery, plan, deploy, the front ends, report, cli).
"""
