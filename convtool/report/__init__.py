"""Renderings of results for people and pipelines: JSON, Markdown and rich tables.

Reads the records of the layers below; computes nothing of its own.
"""
