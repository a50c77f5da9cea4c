"""Myriad: pre-train, evaluate, compress and serve Mixture-of-Experts language models on a budget."""

__version__ = "0.1.0"
