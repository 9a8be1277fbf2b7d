"""The bottom layer: SVD math, the separable modules, the records, input and naming helpers.

Nothing here imports from the layers above (measure, convert, deploy, report, cli).
"""
