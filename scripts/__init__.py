"""Thin command-line wrappers over library code."""
