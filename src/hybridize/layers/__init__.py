"""Sequence mixers and the other building blocks of HybridLM."""
