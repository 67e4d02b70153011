"""The `dsv3 preprocess` YAML: inputs, output, the steps in order, dedup and tokenization.

    name: demo
    inputs:
      - {path: data/stdlib.jsonl.zst, split: 4}
    output: data/demo
    workers: 2
    steps:
      - fix_unicode
      - gopher_quality: {min_words: 20, when: {meta.kind: prose}}
    dedup: {minhash: {threshold: 0.7}}
    tokenize: {tokenizer: data/demo/tokenizer, train: {vocab_size: 8192}}

Each step is a name, or a one-key mapping from the name to its parameters. An unknown step or
parameter is one ConfigError line naming the file and the key.

Public API: `STEP_TYPES`, `StepSpec`, `DedupConfig`, `TokenizerTrainConfig`, `TokenizeConfig`,
`PipelineConfig`, `pipeline_config_from_dict`, `load_pipeline_config`, `build_steps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

from dsv3.config import ConfigError, apply_overrides, load_yaml, validate_config
from dsv3.data.dedup import MinHashConfig
from dsv3.data.document import Step, StepParams
from dsv3.data.readers import InputConfig
from dsv3.data.steps.clean import FixUnicode, HtmlToText, NormalizeWhitespace, ScrubPII
from dsv3.data.steps.code import CodeQuality
from dsv3.data.steps.filters import C4Quality, GopherQuality, GopherRepetition
from dsv3.data.steps.langid import LanguageFilter
from dsv3.data.steps.quality_models import FastTextFilter, KenLMFilter

__all__ = [
    "STEP_TYPES",
    "StepSpec",
    "DedupConfig",
    "TokenizerTrainConfig",
    "TokenizeConfig",
    "PipelineConfig",
    "pipeline_config_from_dict",
    "load_pipeline_config",
    "build_steps",
]

STEP_TYPES: dict[str, type[Step]] = {
    cls.type: cls
    for cls in (
        FixUnicode,
        HtmlToText,
        NormalizeWhitespace,
        ScrubPII,
        LanguageFilter,
        GopherQuality,
        GopherRepetition,
        C4Quality,
        CodeQuality,
        FastTextFilter,
        KenLMFilter,
    )
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class StepSpec(_Strict):
    """One validated step: its type and its parameters (the type's own Params model)."""

    type: str
    params: SerializeAsAny[StepParams]


class DedupConfig(_Strict):
    """Global deduplication after the per-part steps: exact (normalised text) and MinHash LSH."""

    exact: bool = True
    near: bool = True
    minhash: MinHashConfig = Field(default_factory=MinHashConfig)
    batch_size: int = Field(default=2048, ge=1, description="documents hashed per batch in a worker")

    @model_validator(mode="after")
    def _not_empty(self) -> DedupConfig:
        if not (self.exact or self.near):
            raise ValueError("exact and near are both false: remove the dedup section instead")
        return self


class TokenizerTrainConfig(_Strict):
    """Train the tokenizer on the pipeline's kept documents when its file does not exist yet."""

    vocab_size: int = Field(gt=0)
    limit: int | None = Field(default=None, gt=0, description="train on the first N kept documents")
    min_frequency: int = Field(default=2, ge=1)


class TokenizeConfig(_Strict):
    """Encode the kept documents (EOS appended) into Megatron .bin/.idx train/valid shards."""

    tokenizer: str = Field(description="tokenizer.json, or the folder holding (or to hold) it")
    train: TokenizerTrainConfig | None = Field(default=None, description="train it first if missing")
    output: str = Field(default="shards", description="shard folder, relative to the pipeline's output")
    valid_fraction: float = Field(default=0.01, ge=0, lt=1)
    seed: int = 0
    batch_size: int = Field(default=512, ge=1, description="documents per encode_batch call")
    max_tokens_per_shard: int = Field(default=1 << 30, ge=1)

    @property
    def tokenizer_file(self) -> Path:
        path = Path(self.tokenizer)
        return path if path.suffix == ".json" else path / "tokenizer.json"

    @model_validator(mode="after")
    def _trainable(self) -> TokenizeConfig:
        if self.train is not None and self.tokenizer_file.name != "tokenizer.json":
            raise ValueError("with train, tokenizer must be a folder or a path ending in tokenizer.json")
        return self


class PipelineConfig(_Strict):
    """Everything one `dsv3 preprocess` run does."""

    name: str = "pipeline"
    description: str = ""
    inputs: list[InputConfig] = Field(min_length=1)
    output: str = Field(description="folder for documents/, rejects/, report.json (and shards/)")
    output_format: Literal["jsonl.zst", "parquet"] = "jsonl.zst"
    workers: int = Field(default=1, ge=1, description="processes working on parts in parallel")
    rejects_samples: int = Field(default=100, ge=0, description="removed texts kept per step and part")
    steps: list[StepSpec] = Field(default_factory=list)
    dedup: DedupConfig | None = None
    tokenize: TokenizeConfig | None = None

    def fingerprint(self) -> dict[str, Any]:
        """What decides the output: everything but the worker count and the description."""
        return self.model_dump(mode="json", exclude={"workers", "description"})


def _parse_step(entry: Any, i: int, source: str) -> StepSpec:
    where = f"{source}: steps[{i}]"
    if isinstance(entry, str):
        name, params = entry, {}
    elif isinstance(entry, dict) and len(entry) == 1:
        name, params = next(iter(entry.items()))
        params = {} if params is None else params
    else:
        raise ConfigError(
            f"{where}: expected a step name or a one-key mapping name: {{params}}, got {entry!r}"
        )
    if name not in STEP_TYPES:
        raise ConfigError(f"{where}: unknown step {name!r} (known: {', '.join(STEP_TYPES)})")
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.{name}: expected a mapping of parameters, got {type(params).__name__}")
    return StepSpec(type=name, params=validate_config(STEP_TYPES[name].Params, params, f"{where}.{name}"))


def pipeline_config_from_dict(data: dict[str, Any], source: str = "pipeline") -> PipelineConfig:
    """Validate a pipeline mapping; each problem is one ConfigError line naming `source` and the key."""
    data = dict(data)
    steps = data.pop("steps", None) or []
    if not isinstance(steps, list):
        raise ConfigError(f"{source}: steps: expected a list, got {type(steps).__name__}")
    specs = [_parse_step(entry, i, source) for i, entry in enumerate(steps)]
    cfg = validate_config(PipelineConfig, data, source)
    return cfg.model_copy(update={"steps": specs})


def load_pipeline_config(
    path: Path | str,
    overrides: list[str] | None = None,
    inputs: list[str] | None = None,
    output: str | None = None,
    workers: int | None = None,
) -> PipelineConfig:
    """Load the YAML, apply `--set` overrides, then `--input` (which keeps the first YAML input's
    settings but its path), `--output` and `--workers`."""
    path = Path(path)
    data = apply_overrides(load_yaml(path), overrides)
    if inputs:
        first = (data.get("inputs") or [{}])[0]
        template = {k: v for k, v in first.items() if k != "path"} if isinstance(first, dict) else {}
        data["inputs"] = [{**template, "path": p} for p in inputs]
    if output is not None:
        data["output"] = output
    if workers is not None:
        data["workers"] = workers
    return pipeline_config_from_dict(data, str(path))


def build_steps(cfg: PipelineConfig) -> list[Step]:
    """Fresh step objects (each worker builds its own); model files are checked and loaded here."""
    return [STEP_TYPES[spec.type](spec.params) for spec in cfg.steps]
