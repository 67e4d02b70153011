"""Inference: generation with MLA's latent KV cache (generate.py, cache.py)."""

from dsv3.infer.cache import LatentCache
from dsv3.infer.generate import generate

__all__ = ["LatentCache", "generate"]
