"""The engine's configuration: one pydantic model, checked against the model it serves."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dsv3.config import ConfigError, ModelConfig

__all__ = ["EngineConfig", "BLOCK_SIZE"]

BLOCK_SIZE = 64  # tokens per cache block: the block size FlashMLA and the Triton MLA kernels use


class EngineConfig(BaseModel):
    """How the engine batches, caches and decodes (vLLM's names where vLLM has the knob)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_num_seqs: int = Field(default=256, ge=1, description="sequences running at once")
    max_model_len: int | None = Field(
        default=None, ge=2, description="prompt + output tokens per sequence; default: the model's context"
    )
    max_num_batched_tokens: int = Field(
        default=8192, ge=1, description="size of a step's prefill forward: rows × its longest chunk"
    )
    max_prefill_chunk: int = Field(
        default=2048, ge=1, description="most prompt tokens one sequence feeds in a step (chunked prefill)"
    )
    block_size: int = Field(default=BLOCK_SIZE, ge=1)
    num_blocks: int | None = Field(default=None, ge=1, description="cache blocks; default: from memory")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="share of GPU memory for weights, activations and cache"
    )
    cpu_cache_gb: float = Field(default=2.0, gt=0, description="cache memory cap on the CPU")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        default="auto", description="auto: the model's dtype; fp8: e4m3 with one scale per token and layer"
    )
    enable_prefix_caching: bool = True
    speculative_tokens: int = Field(
        default=0, ge=0, le=1, description="tokens the MTP module drafts per step (0: no speculation)"
    )
    cuda_graphs: bool | None = Field(
        default=None, description="capture decode steps in CUDA graphs; default: on a GPU"
    )
    compile: bool | None = Field(
        default=None, description="torch.compile the step functions (fused kernels, then captured in "
        "the CUDA graphs), every shape family at engine start; default: with cuda_graphs",
    )
    async_scheduling: bool | None = Field(
        default=None, description="launch the next decode step before reading this one back, so the "
        "host's work overlaps the device's; default: on a GPU (a CPU runs a launch to its end, so "
        "there it only delays each output by a step)",
    )
    seed: int = Field(default=0, description="draws the seeds of requests that bring none")

    def resolved(self, model: ModelConfig) -> EngineConfig:
        """This config with its defaults filled in for `model`; an error naming the field it cannot honour."""
        update: dict = {}
        max_len = self.max_model_len or model.max_position_embeddings
        if max_len > model.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {max_len} exceeds the model's max_position_embeddings "
                f"{model.max_position_embeddings}"
            )
        update["max_model_len"] = max_len
        if self.speculative_tokens and model.num_nextn_predict_layers < 1:
            raise ConfigError(
                "speculative_tokens: the model has no MTP module to draft with (num_nextn_predict_layers 0)"
            )
        return self.model_copy(update=update)

    def blocks_per_seq(self) -> int:
        """Blocks one sequence of max_model_len tokens needs, with room for a speculative draft."""
        assert self.max_model_len is not None, "call resolved() first"
        return -(-(self.max_model_len + self.speculative_tokens) // self.block_size)
