"""tierprune: progressive three-tier block pruning for causal language models."""
__version__ = "0.1.0"
