"""Tightwad: speculative decoding across mixed machines, identical to the target alone."""

__version__ = "0.1.0"
