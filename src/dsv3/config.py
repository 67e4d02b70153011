"""Typed configuration: one pydantic model per concern, YAML loading and dotted overrides.

`ModelConfig` uses the field names of the Hugging Face DeepSeek-V3 `config.json`, so a
published config loads as-is. Every error is one line naming the file, the key and what was
expected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "RopeScaling",
    "yarn_mscale",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "PP_SCHEDULES",
    "ParallelConfig",
    "RunConfig",
    "PRESETS_DIR",
    "preset_names",
    "resolve_config_path",
    "load_yaml",
    "apply_overrides",
    "load_run_config",
    "load_model_config",
    "validate_config",
]


class ConfigError(ValueError):
    """A configuration problem, described in one line: where, which key, what was expected."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

# Keys of a Hugging Face DeepSeek-V3 config.json that do not change the math. They are accepted
# and kept in `ModelConfig.hf_extras`, so a config round-trips through dsv3 unchanged.
HF_PASSTHROUGH_KEYS = frozenset(
    {
        "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
        "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
        "pretraining_tp", "ep_size", "aux_loss_alpha", "seq_aux", "quantization_config",
        "output_hidden_states", "output_attentions", "output_router_logits", "return_dict",
        "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
        "_name_or_path", "tokenizer_class", "num_mtp_layers",
    }
)

# Keys transformers derives from the others; dropped on load and written fresh by to_hf_dict.
HF_DERIVED_KEYS = frozenset({"head_dim", "qk_head_dim"})

# Keys whose value changes the math: only the value DeepSeek-V3 uses is supported.
HF_FIXED_KEYS: dict[str, Any] = {
    "hidden_act": "silu",
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "attention_bias": False,
    "attention_dropout": 0.0,
}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1·mscale·ln(factor) + 1 (1.0 when the context is not extended)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class RopeScaling(_Strict):
    """YaRN context extension as DeepSeek-V3 defines it (`rope_scaling` in config.json)."""

    type: Literal["yarn"] = "yarn"
    factor: float = Field(gt=0)
    original_max_position_embeddings: int = Field(gt=0)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _accept_rope_type(cls, data: Any) -> Any:
        # transformers writes "rope_type"; the published checkpoints write "type".
        if isinstance(data, dict) and "rope_type" in data:
            data = dict(data)
            data.setdefault("type", data.pop("rope_type"))
        return data


class ModelConfig(_Strict):
    """The architecture, with the Hugging Face DeepSeek-V3 field names."""

    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="hidden width of the dense FFN layers")
    moe_intermediate_size: int = Field(gt=0, description="hidden width of each expert")
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    q_lora_rank: int | None = Field(description="rank of the query compression; null = plain q_proj")
    kv_lora_rank: int = Field(gt=0)
    qk_nope_head_dim: int = Field(gt=0)
    qk_rope_head_dim: int = Field(gt=0)
    v_head_dim: int = Field(gt=0)
    n_routed_experts: int = Field(gt=0)
    n_shared_experts: int = Field(ge=0)
    num_experts_per_tok: int = Field(gt=0)
    n_group: int = Field(default=1, gt=0)
    topk_group: int = Field(default=1, gt=0)
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    first_k_dense_replace: int = Field(default=0, ge=0)
    moe_layer_freq: int = Field(default=1, gt=0)
    num_nextn_predict_layers: int = Field(default=0, ge=0)
    rope_theta: float = Field(default=10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = Field(default=4096, gt=0)
    rms_norm_eps: float = Field(default=1e-6, gt=0)
    tie_word_embeddings: bool = False
    hf_extras: dict[str, Any] = Field(default_factory=dict, description="HF keys kept as-is")

    @field_validator("q_lora_rank")
    @classmethod
    def _positive_rank(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError("must be a positive integer or null (no query compression)")
        return v

    @field_validator("qk_rope_head_dim")
    @classmethod
    def _even_rope(cls, v: int) -> int:
        if v % 2:
            raise ValueError("must be even (RoPE rotates pairs)")
        return v

    @model_validator(mode="before")
    @classmethod
    def _from_hf_spelling(cls, data: Any) -> Any:
        """Accept config.json as transformers 4 or 5 writes it."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        extras = dict(data.pop("hf_extras", None) or {})
        params = data.pop("rope_parameters", None)
        if params is not None:
            # transformers 5: {"rope_theta": ..., "rope_type": "default"|"yarn", ...yarn fields}
            params = dict(params)
            if "rope_theta" in params:
                data.setdefault("rope_theta", params.pop("rope_theta"))
            rope_type = params.pop("rope_type", params.pop("type", "default"))
            if rope_type == "yarn":
                data.setdefault("rope_scaling", {"type": "yarn", **params})
            elif rope_type != "default":
                raise ValueError(
                    f"rope_parameters.rope_type: unsupported {rope_type!r} (expected default or yarn)"
                )
        n_kv = data.pop("num_key_value_heads", None)
        if n_kv is not None and n_kv != data.get("num_attention_heads", n_kv):
            raise ValueError(f"num_key_value_heads: MLA needs it equal to num_attention_heads, got {n_kv}")
        for key, expected in HF_FIXED_KEYS.items():
            if key in data:
                value = data.pop(key)
                if value != expected:
                    raise ValueError(f"{key}: only {expected!r} is supported, got {value!r}")
        for key in HF_DERIVED_KEYS:
            data.pop(key, None)
        for key in list(data):
            if key in HF_PASSTHROUGH_KEYS:
                extras[key] = data.pop(key)
        if extras:
            data["hf_extras"] = extras
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelConfig:
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_group ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group ({self.topk_group}) must be <= n_group ({self.n_group})")
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.num_experts_per_tok > reachable:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the kept groups "
                f"({reachable})"
            )
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError(
                "each expert group needs at least 2 experts (groups are ranked by their top-2 scores)"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError(
                f"first_k_dense_replace ({self.first_k_dense_replace}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers})"
            )
        return self

    # --- derived quantities, one home for each ------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_latent_dim(self) -> int:
        """Values MLA caches per token and layer: the latent c_kv and the shared rope key k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek-V3's rule: dense for the first k layers, then MoE every `moe_layer_freq`-th layer."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times YaRN's mscale² when context is extended with mscale_all_dim."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
        return scale

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that transformers' DeepseekV3Config reads (transformers 4 and 5)."""
        d = self.model_dump(exclude={"hf_extras", "rope_scaling"})
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.model_dump()
        d["num_key_value_heads"] = self.num_attention_heads
        d["qk_head_dim"] = self.qk_head_dim
        d["head_dim"] = self.qk_rope_head_dim  # transformers' name for the rotary width
        d.update(HF_FIXED_KEYS)
        extras = {k: v for k, v in self.hf_extras.items() if k not in ("quantization_config",)}
        d.update(extras)
        d.setdefault("model_type", "deepseek_v3")
        d.setdefault("architectures", ["DeepseekV3ForCausalLM"])
        return d


# --------------------------------------------------------------------------------------------
# Data, training, parallelism
# --------------------------------------------------------------------------------------------


class DataConfig(_Strict):
    """Where the trainer reads token shards (the `.bin/.idx` prefixes the data pipeline writes)."""

    train: list[str] = Field(default_factory=list, description="shard prefixes or directories")
    valid: list[str] = Field(default_factory=list, description="validation shard prefixes or directories")
    tokenizer: str | None = Field(default=None, description="tokenizer.json for samples and generation")
    valid_fraction: float = Field(
        default=0.02, gt=0, lt=1, description="share of the training windows held out when `valid` is empty"
    )


class TrainConfig(_Strict):
    """The optimisation schedule and the loop's switches."""

    steps: int = Field(default=1000, gt=0)
    global_batch_size: int = Field(default=8, gt=0, description="sequences per optimizer step")
    micro_batch_size: int = Field(default=8, gt=0, description="sequences per forward pass per rank")
    seq_len: int = Field(default=512, gt=0)
    lr: float = Field(default=3e-4, gt=0)
    min_lr: float = Field(default=3e-5, ge=0)
    schedule: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup_steps: int = Field(default=100, ge=0)
    decay_fraction: float = Field(default=0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer_state_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="AdamW's moments: bfloat16 halves them (4 bytes a parameter instead "
        "of 8) and the step's memory traffic, as DeepSeek-V3 trains; master weights stay float32. "
        "auto = bfloat16 with bf16 weights (`param_dtype`), else float32",
    )
    param_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="the model's weights while training: bfloat16 keeps bf16 weights "
        "for the forward and backward (no casts each step, bf16 gradients, a bf16 residual stream) and "
        "their float32 masters in the optimizer, micro-batch gradients summed in float32, as Megatron's "
        "bf16 training does; checkpoints hold the float32 masters. One process only (FSDP already "
        "computes in bf16 from float32 shards). auto = bfloat16 where the run computes in bf16 (`dtype`) "
        "in one process, else float32",
    )
    grad_clip: float = Field(default=1.0, ge=0, description="0 disables clipping")
    mtp_lambda: float = Field(default=0.3, ge=0, description="weight of the MTP loss")
    balance_alpha: float = Field(
        default=1e-4, ge=0, description="sequence-wise balance loss weight α (DeepSeek-V3: 0.0001)"
    )
    bias_update_speed: float | Literal["auto"] = Field(
        default="auto",
        description="γ of aux-loss-free balancing: a number, or auto = DeepSeek-V3's ratio to the learning "
        "rate (0.001 at lr 2.2e-4), held at the peak through warmup; see docs/training.md",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = cuda when available")
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    compile: Literal[False, True, "blocks", "model"] = Field(
        default=False, description="torch.compile: true or blocks = each decoder block (and the head's "
        "loss) on its own, as every layout runs; model = the whole training forward as one graph (one "
        "process only: kernels fuse across block boundaries, one longer compile)",
    )
    fp8: bool = Field(
        default=False, description="GEMMs in FP8: attention's projections and the dense and shared-expert "
        "FFNs with DeepSeek-V3's 1x128 / 128x128 scaling, the routed experts' forward and input gradient "
        "rowwise-scaled (cuBLAS on a CUDA GPU, emulated in float32 elsewhere); the router, embedding and "
        "head stay bf16. Slower than bf16 at the small preset's width on an H200 (0.78x; "
        "docs/performance.md): the conversions outweigh the gain until GEMMs are much wider",
    )
    activation_checkpointing: bool | Literal["selective"] = Field(
        default=False, description="true: recompute every block in the backward, keeping only its "
        "input; selective: keep its GEMM and attention outputs, recompute the rest (norms, RoPE, SwiGLU)",
    )
    loss_chunk_tokens: int = Field(
        default=0, ge=0, description="> 0: compute the training losses this many positions at a time, "
        "each chunk's gradients made with its logits, instead of keeping all logits (0 = off; no pipeline)",
    )
    seed: int = 1234

    def computes_in_bf16(self, device_type: str) -> bool:
        """Whether the forward and backward run in bf16 (`dtype`; auto: on a GPU)."""
        return self.dtype == "bfloat16" or (self.dtype == "auto" and device_type == "cuda")

    def bf16_weights(self, device_type: str, processes: int) -> bool:
        """Whether the model holds bf16 weights with float32 masters in the optimizer (`param_dtype`)."""
        if self.param_dtype == "auto":
            return self.computes_in_bf16(device_type) and processes == 1
        return self.param_dtype == "bfloat16"

    def bf16_moments(self, device_type: str, processes: int) -> bool:
        """Whether AdamW keeps its moments in bf16 (`optimizer_state_dtype`; auto: with bf16 weights)."""
        return self.bf16_moments_with(self.bf16_weights(device_type, processes))

    def bf16_moments_with(self, bf16_weights: bool) -> bool:
        """`bf16_moments` once the weights' precision is known (the optimizer sees it as masters)."""
        if self.optimizer_state_dtype == "auto":
            return bf16_weights
        return self.optimizer_state_dtype == "bfloat16"

    eval_every: int = Field(default=200, gt=0)
    eval_batches: int = Field(default=8, gt=0)
    save_every: int = Field(
        default=500, ge=0, description="checkpoint every this many steps and at the end; 0 = never (a "
        "throughput or sweep run that keeps nothing)",
    )
    keep_last: int = Field(default=2, gt=0)
    async_checkpoint: bool = Field(
        default=False, description="write checkpoints in the background: training stalls only while the "
        "state is copied to host memory",
    )
    log_every: int = Field(default=10, gt=0)
    max_bad_steps: int = Field(default=5, gt=0, description="stop after this many non-finite steps in a row")
    output_dir: str = "runs/default"
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "dsv3"
    sample_prompt: str | None = None
    sample_tokens: int = Field(default=48, ge=0)
    profile_steps: int = Field(
        default=0, ge=0, description="> 0: record this many steps with torch.profiler (every rank writes "
        "a kernel table and a Chrome trace under output_dir/profile/; 0 = off)",
    )
    profile_from: int = Field(
        default=10, gt=0, description="the first profiled step (after warm-up and compilation)"
    )

    @field_validator("bias_update_speed", mode="before")
    @classmethod
    def _auto_or_speed(cls, v: Any) -> Any:
        if v == "auto":
            return v
        try:  # YAML reads 1e-3 (no dot) as a string
            speed = float(v) if isinstance(v, str | int | float) and not isinstance(v, bool) else math.nan
        except ValueError:
            speed = math.nan
        if not (math.isfinite(speed) and speed >= 0):
            raise ValueError("expected auto or a number >= 0")
        return speed

    @model_validator(mode="after")
    def _check_batches(self) -> TrainConfig:
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size "
                f"({self.micro_batch_size})"
            )
        return self

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.steps * self.tokens_per_step


PP_SCHEDULES = ("1F1B", "interleaved1F1B", "ZBVZeroBubble", "DualPipeV")


class ParallelConfig(_Strict):
    """How a run is laid out over GPUs: torchrun's world is dp_replicate × dp_shard × tp × pp ranks.

    The model stays free of it; `dsv3.parallel` builds one device mesh from it and applies the plans.
    """

    gpus: int = Field(default=1, gt=0, description="world size = dp_replicate * dp_shard * tp * pp")
    dp_replicate: int = Field(default=1, gt=0, description="replicas of the FSDP shards (HSDP)")
    dp_shard: int = Field(default=1, gt=0, description="FSDP2 sharding degree")
    tp: int = Field(default=1, gt=0, description="tensor-parallel degree (attention and dense FFNs)")
    pp: int = Field(default=1, gt=0, description="pipeline-parallel ranks")
    ep: int = Field(default=1, gt=0, description="expert-parallel degree, carved out of the dp_shard ranks")
    ep_dispatch: Literal["all_to_all", "all_gather"] = Field(
        default="all_to_all", description="how tokens reach their experts' ranks: all_to_all sends each "
        "token to the ranks holding its experts (one host sync per MoE layer for the message sizes); "
        "all_gather gives every rank all of its group's tokens (fixed sizes, no host sync; traffic grows "
        "with ep, so for ep within a node)",
    )
    ep_chunks: int | None = Field(
        default=None, gt=0, description="all_gather dispatch: each MoE layer's tokens in this many chunks, "
        "dispatched one after another, so that compiled on a GPU one chunk's exchanges run behind another "
        "chunk's experts (Inductor's reordering passes); more chunks hide more of the exchanges and run "
        "smaller GEMMs. Default: 2 with the all_gather dispatch (faster than 1 on 2 H200s), else 1",
    )
    pp_schedule: Literal["1F1B", "interleaved1F1B", "ZBVZeroBubble", "DualPipeV"] = "1F1B"
    reshard_after_forward: bool | None = Field(
        default=None, description="FSDP2: true frees gathered weights after forward (ZeRO-3); false keeps "
        "them for backward (ZeRO-2-like: less communication, more memory); default: true, false with pp > 1",
    )
    fsdp_unit_blocks: int = Field(
        default=1, gt=0, description="FSDP2: consecutive decoder blocks gathered, freed and reduced as one "
        "unit; more blocks per unit mean fewer, larger collectives and less host work per step, and more "
        "weights gathered at a time (no pipeline)",
    )
    cpu_offload: bool = Field(default=False, description="FSDP2: keep sharded weights, gradients and "
                              "optimizer state in CPU memory")
    grad_sync: Literal["every_micro_batch", "last_micro_batch"] = Field(
        default="every_micro_batch", description="FSDP2 without a pipeline, several micro-batches a step: "
        "reduce(-scatter) the gradients after every micro-batch (they stay sharded: least memory) or only "
        "after the last (one reduction a step: less communication, the unsharded gradients held in fp32 "
        "meanwhile). Pipelines always reduce once, after the last (torch's schedules)",
    )
    max_nodes_per_token: int | None = Field(
        default=None, gt=0, description="node-limited routing: each token's experts lie on at most this many "
        "nodes (DeepSeek-V3: 4); needs expert groups that map onto nodes",
    )
    gpu_memory_gb: float = Field(default=80.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _old_schedule_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("pp_schedule") == "dualpipe":
            raise ValueError("pp_schedule: 'dualpipe' is now 'DualPipeV' (torch.distributed.pipelining's "
                             f"name); expected one of {', '.join(PP_SCHEDULES)}")
        return data

    @model_validator(mode="after")
    def _check_layout(self) -> ParallelConfig:
        product = self.dp_replicate * self.dp_shard * self.tp * self.pp
        if product != self.gpus:
            raise ValueError(
                f"dp_replicate*dp_shard*tp*pp = {product} but gpus = {self.gpus}"
            )
        if self.dp_shard % self.ep:
            raise ValueError(
                f"ep ({self.ep}) must divide dp_shard ({self.dp_shard}): experts are split over ep of the "
                "FSDP ranks and sharded over the rest"
            )
        if (self.ep_chunks or 1) > 1 and (self.ep == 1 or self.ep_dispatch != "all_gather"):
            raise ValueError(f"ep_chunks ({self.ep_chunks}) splits the all_gather dispatch: it needs ep > 1 "
                             f"and ep_dispatch all_gather (got ep {self.ep}, ep_dispatch {self.ep_dispatch})")
        return self

    @property
    def expert_chunks(self) -> int:
        """`ep_chunks`, or its default: 2 for the all_gather dispatch under expert parallelism, else 1."""
        if self.ep_chunks is not None:
            return self.ep_chunks
        return 2 if self.ep > 1 and self.ep_dispatch == "all_gather" else 1

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads its own share of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each pp rank holds: 2 for the interleaved and V-shaped schedules."""
        return 1 if self.pp == 1 or self.pp_schedule == "1F1B" else 2


class RunConfig(_Strict):
    """Everything one `dsv3 train` needs. `model` may name a preset or a file; it is resolved on load."""

    name: str = "run"
    description: str = ""
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)

    @model_validator(mode="after")
    def _check_combination(self) -> RunConfig:
        if self.train.loss_chunk_tokens and self.parallel.pp > 1:
            raise ValueError("train.loss_chunk_tokens works without a pipeline only: the last stage of "
                             "parallel.pp > 1 computes its losses from whole logits; set one of them off")
        return self


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


# The presets are package data (the checkout's top-level configs/ is a link to this folder).
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


def preset_names() -> list[str]:
    """The run presets shipped in `configs/` (every top-level YAML there)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_config_path(ref: str | Path, relative_to: Path | None = None) -> Path:
    """A path as given, else relative to the referring file, else a preset name in `configs/`."""
    ref_path = Path(ref)
    candidates = [ref_path]
    if relative_to is not None and not ref_path.is_absolute():
        candidates.append(relative_to.parent / ref_path)
    if ref_path.suffix == "" and not ref_path.is_absolute():  # a preset: tiny, train/demo
        candidates.append(PRESETS_DIR / f"{ref}.yaml")
    for c in candidates:
        if c.is_file():
            return c
        if c.is_dir() and (c / "config.json").is_file():  # a Hugging Face checkpoint directory
            return c / "config.json"
    hint = f" (presets: {', '.join(preset_names())})" if ref_path.suffix == "" else ""
    raise ConfigError(f"{ref}: no such config file{hint}")


def load_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping; errors name the file, line and column."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item}: expected key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `a.b=c` overrides (values parsed as YAML scalars) on a nested dict, last one wins."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides or []:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _format_validation_error(source: str, err: ValidationError, overrides: list[str] | None = None) -> str:
    """One line: `source: key: problem; key: problem`. A key a `--set` gave is blamed on that --set."""
    given = {item.split("=", 1)[0].strip(): item for item in overrides or []}
    parts, blamed = [], set()
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        parts.append(f"{loc}: {msg}")
        if loc in given:
            blamed.add(given[loc])
    where = " ".join(f"--set {item}" for item in sorted(blamed)) + (" on " if blamed else "")
    return f"{where}{source}: " + "; ".join(parts)


def validate_config(
    cls: type[BaseModel], data: dict[str, Any], source: str, overrides: list[str] | None = None
) -> Any:
    """Validate `data` as `cls`; a failure becomes one ConfigError line naming `source` and the keys
    (and the `--set` overrides that gave a failing key)."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(source, e, overrides)) from None


def _model_section(value: Any, source: Path) -> dict[str, Any]:
    """A run's `model:` is a mapping, or a reference to a preset / YAML / HF config.json.

    A mapping with `base: <reference>` starts from that model and changes the keys it lists, e.g.
    `{base: tiny, vocab_size: 4096}`.
    """
    if isinstance(value, dict):
        if "base" not in value:
            return value
        base = _model_section(value["base"], source)
        while isinstance(base, str):
            base = _model_section(base, source)
        return {**base, **{k: v for k, v in value.items() if k != "base"}}
    if isinstance(value, str):
        path = resolve_config_path(value, relative_to=source)
        data = load_yaml(path)
        # A run preset nests the model; a model file or HF config.json is the model itself.
        return data["model"] if "model" in data and isinstance(data["model"], dict | str) else data
    raise ConfigError(
        f"{source}: model: expected a mapping or a preset/file name, got {type(value).__name__}"
    )


def load_run_config(ref: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config (file path or preset name), apply `--set` overrides, validate."""
    path = resolve_config_path(ref)
    data = load_yaml(path)
    if "model" in data:
        model = _model_section(data["model"], path)
        while isinstance(model, str):  # a preset whose model refers to another file
            model = _model_section(model, path)
        data["model"] = model
    data = apply_overrides(data, overrides)
    return validate_config(RunConfig, data, str(path), overrides)


def load_model_config(ref: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """Load a ModelConfig from a HF config.json, a model YAML, or a run config / preset."""
    path = resolve_config_path(ref)
    data = _model_section(str(path), path)
    data = apply_overrides(data, overrides)
    return validate_config(ModelConfig, data, str(path), overrides)
