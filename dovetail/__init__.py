"""Dovetail: heterogeneous speculative decoding (small draft proposes, big CPU target verifies)."""

__version__ = "0.1.0"
