"""Turning dense convs into separable pairs: find, plan, rewrite, prove, calibrate, distill.

Imports ``convtool.core`` and ``convtool.measure``; never ``deploy``, ``report`` or the CLI.
"""
