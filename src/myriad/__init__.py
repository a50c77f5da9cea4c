"""Myriad: pre-train, evaluate, compress and serve Mixture-of-Experts LMs on a budget."""

__version__ = "0.1.0"
