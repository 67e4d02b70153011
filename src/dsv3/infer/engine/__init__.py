"""The serving engine, in nano-vllm's shape: sequence → scheduler (pure Python) → block manager
(paged blocks, prefix hashes) → model runner (paged latent cache, CUDA graphs, MTP drafts)."""

from dsv3.infer.engine.config import EngineConfig
from dsv3.infer.engine.llm_engine import CompletionOutput, EngineStats, LLMEngine, RequestError, RequestOutput

__all__ = ["EngineConfig", "LLMEngine", "RequestOutput", "CompletionOutput", "EngineStats", "RequestError"]
