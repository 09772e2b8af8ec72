"""Evaluation: scorers, perplexity vs length, retrieval grids, plots, prompt compression."""
