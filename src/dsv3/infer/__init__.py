"""Inference above the model: the static-batch decoder (cache.py, generate.py), the serving engine
(engine/: scheduler, block manager, paged cache, model runner), the offline API (llm.py), sampling,
text in/out (tokenizer.py, text.py) and the OpenAI-compatible server (server/)."""

from dsv3.infer.cache import LatentCache
from dsv3.infer.engine import EngineConfig, LLMEngine, RequestOutput
from dsv3.infer.generate import generate
from dsv3.infer.llm import LLM
from dsv3.infer.sampling import SamplingParams

__all__ = ["LatentCache", "generate", "LLM", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput"]
