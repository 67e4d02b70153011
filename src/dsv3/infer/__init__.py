"""Inference above the model: the latent cache (cache.py), generation (generate.py), text in/out (text.py)."""

from dsv3.infer.cache import LatentCache
from dsv3.infer.generate import generate

__all__ = ["LatentCache", "generate"]
