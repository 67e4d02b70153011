"""Hugging Face DeepSeek-V3 checkpoints in and out: config.json + safetensors, nothing pickled.

Our state-dict keys are the HF names, so interchange is one rename table (`hf_tensor_table`):
  - routed experts: stacked `…mlp.experts.gate_up_proj` (E, 2I, d) / `down_proj` (E, d, I) here,
    `…mlp.experts.{j}.{gate,up,down}_proj.weight` in the file;
  - MTP depth k: `mtp.{k}.*` here (`block.*` for its decoder block, `head_norm` for
    `shared_head.norm`), `model.layers.{num_hidden_layers+k}.*` in the file, which also stores
    copies of the shared `embed_tokens` and `shared_head.head`: written on save, checked on load.
FP8 checkpoints (float8_e4m3fn weights with a `weight_scale_inv` per 128×128 block) are
dequantized as they are read. A checkpoint without any MTP tensors (what transformers'
save_pretrained writes) loads as a model without MTP.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dsv3.checkpoints import CheckpointError, is_sharded
from dsv3.config import ModelConfig, load_yaml, validate_config
from dsv3.model.fp8 import FP8_BLOCK, dequantize_fp8
from dsv3.model.safetensors_dir import INDEX_FILE, SINGLE_FILE, parse_size, write_safetensors_dir
from dsv3.model.sharded import read_sharded
from dsv3.model.transformer import Transformer

__all__ = [
    "HFTensor",
    "hf_tensor_table",
    "read_hf_config",
    "read_hf_tensors",
    "hf_config_json",
    "load_hf",
    "save_hf",
    "convert_hf",
    "parse_size",
    "parse_dtype",
]

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------------------------
# The rename table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HFTensor:
    """Where one checkpoint tensor lives in our state dict: state[key][index], of `shape`."""

    key: str
    index: tuple
    shape: tuple[int, ...]
    shared_copy: bool = False  # an MTP copy of the embedding or head: written, not loaded


def _hf_name(key: str, cfg: ModelConfig) -> str:
    m = re.match(r"mtp\.(\d+)\.(.*)", key)
    if not m:
        return key
    prefix, rest = f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.", m.group(2)
    if rest.startswith("block."):
        return prefix + rest.removeprefix("block.")
    if rest.startswith("head_norm."):
        return prefix + "shared_head.norm." + rest.removeprefix("head_norm.")
    return prefix + rest


def hf_tensor_table(model: Transformer) -> dict[str, HFTensor]:
    """HF tensor name → HFTensor, for every tensor a HF DeepSeek-V3 checkpoint of this model holds."""
    cfg = model.config
    inter = cfg.moe_intermediate_size
    table: dict[str, HFTensor] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # transformers stores a tied head once, as the embedding
        name = _hf_name(key, cfg)
        if name.endswith(".mlp.experts.gate_up_proj"):
            base = name.removesuffix(".gate_up_proj")
            for j in range(t.shape[0]):
                table[f"{base}.{j}.gate_proj.weight"] = HFTensor(
                    key, (j, slice(0, inter)), (inter, t.shape[2])
                )
                table[f"{base}.{j}.up_proj.weight"] = HFTensor(
                    key, (j, slice(inter, 2 * inter)), (inter, t.shape[2])
                )
        elif name.endswith(".mlp.experts.down_proj"):
            base = name.removesuffix(".down_proj")
            for j in range(t.shape[0]):
                table[f"{base}.{j}.down_proj.weight"] = HFTensor(key, (j,), tuple(t.shape[1:]))
        else:
            table[name] = HFTensor(key, (), tuple(t.shape))
    for k in range(cfg.num_nextn_predict_layers):
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        for name, key in (
            ("embed_tokens.weight", "model.embed_tokens.weight"),
            ("shared_head.head.weight", "lm_head.weight"),
        ):
            table[prefix + name] = HFTensor(
                key, (), table[key if key in table else "model.embed_tokens.weight"].shape, True
            )
    return table


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' | 'float16' | 'float32' | torch dtype | None (keep) → torch dtype or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name in ("auto", "", "none"):
        return None
    if name not in _DTYPES:
        raise CheckpointError(f"dtype {value!r}: expected one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def read_hf_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a HF checkpoint directory (either rope spelling)."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    return validate_config(ModelConfig, load_yaml(cfg_path), str(cfg_path))


def _checkpoint_files(path: Path) -> dict[str, str]:
    """Tensor name → file name, from the index or the single file."""
    if (path / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX_FILE}: not a safetensors index ({e})") from None
        for file in set(weight_map.values()):
            if not (path / file).is_file():
                raise CheckpointError(f"{path / INDEX_FILE}: lists {file}, which does not exist")
        return weight_map
    if (path / SINGLE_FILE).is_file():
        with _open(path / SINGLE_FILE) as f:
            return {name: SINGLE_FILE for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = f" ({', '.join(found)} are pickles, which dsv3 never loads)" if found else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _open(file: Path):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def read_hf_tensors(path: str | Path, table: dict[str, HFTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for every checkpoint tensor, FP8 dequantized to float32.

    Checks each name against `table` and each shape before yielding; raises CheckpointError for an
    unexpected, misshapen or missing tensor, naming it and its file. A sharded training checkpoint
    (`dsv3.checkpoints.is_sharded`) is read through `dsv3.model.sharded`, one stacked tensor at a time.
    """
    path = Path(path)
    if is_sharded(path):
        yield from _read_sharded_as_hf(path, table)
        return
    weight_map = _checkpoint_files(path)
    cfg_extras = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    block = tuple(cfg_extras.get("weight_block_size", FP8_BLOCK))
    handles: dict[str, object] = {}

    def get(name: str) -> torch.Tensor:
        file = weight_map[name]
        if file not in handles:
            handles[file] = _open(path / file).__enter__()
        try:
            return handles[file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path / file}: cannot read tensor {name} ({e})") from None

    seen: set[str] = set()
    try:
        for name, file in weight_map.items():
            if name.endswith(".weight_scale_inv") or name.endswith("rotary_emb.inv_freq"):
                continue  # a scale is read with its weight; rotary tables are recomputed
            spec = table.get(name)
            if spec is None:
                raise CheckpointError(
                    f"{path / file}: unexpected tensor {name} (not part of this DeepSeek-V3 config)"
                )
            t = get(name)
            if t.dtype == torch.float8_e4m3fn:
                scale_name = name + "_scale_inv"
                if scale_name not in weight_map:
                    raise CheckpointError(f"{path / file}: FP8 tensor {name} has no {scale_name}")
                scale = get(scale_name)
                expected = tuple(math.ceil(n / b) for n, b in zip(t.shape, block, strict=True))
                if tuple(scale.shape) != expected:
                    raise CheckpointError(
                        f"{path / weight_map[scale_name]}: {scale_name} has shape {tuple(scale.shape)}, "
                        f"expected {expected}"
                    )
                t = dequantize_fp8(t, scale, block)
            if tuple(t.shape) != spec.shape:
                raise CheckpointError(
                    f"{path / file}: tensor {name} has shape {tuple(t.shape)}, expected {spec.shape}"
                )
            seen.add(name)
            yield name, t
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    missing = [n for n, spec in table.items() if n not in seen and not spec.shared_copy]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: missing tensor {missing[0]}{more}")


def _read_sharded_as_hf(path: Path, table: dict[str, HFTensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of a sharded checkpoint: each of our tensors read once, split into its HF names."""
    by_key: dict[str, list[str]] = {}
    for name, spec in table.items():
        by_key.setdefault(spec.key, []).append(name)
    for key, t in read_sharded(path, list(by_key)):
        for name in by_key[key]:
            spec = table[name]
            part = t[spec.index]
            if tuple(part.shape) != spec.shape:
                raise CheckpointError(f"{path}: tensor {key} gives {name} of shape {tuple(part.shape)}, "
                                      f"expected {spec.shape}")
            yield name, part


def _without_absent_mtp(path: Path, cfg: ModelConfig) -> ModelConfig:
    """transformers' save_pretrained drops the MTP layers: then the model has none."""
    if is_sharded(path):
        return cfg  # written by dsv3 from the model itself: MTP tensors are there when configured
    if cfg.num_nextn_predict_layers and not any(_is_mtp(n, cfg) for n in _checkpoint_files(path)):
        log.warning(
            "%s: no MTP tensors in the checkpoint; loading without MTP (num_nextn_predict_layers=0)", path
        )
        return cfg.model_copy(update={"num_nextn_predict_layers": 0})
    return cfg


def _config_dtype(cfg: ModelConfig) -> torch.dtype:
    for key in ("dtype", "torch_dtype"):
        value = cfg.hf_extras.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in _DTYPES:
            return _DTYPES[value.removeprefix("torch.")]
    return torch.float32


def load_hf(
    path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """A Transformer with the weights of a HF DeepSeek-V3 checkpoint directory.

    `dtype` defaults to the config's `dtype`/`torch_dtype` (float32 when absent); the router's bias
    stays float32 whatever the dtype.
    """
    path = Path(path)
    cfg = _without_absent_mtp(path, read_hf_config(path))
    dtype = parse_dtype(dtype) or _config_dtype(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device).to(dtype)
    model.init_buffers()
    state = model.state_dict(keep_vars=True)
    table = hf_tensor_table(model)
    copies = []
    with torch.no_grad():
        for name, t in read_hf_tensors(path, table):
            spec = table[name]
            if spec.shared_copy:
                copies.append((name, t))
                continue
            state[spec.key][spec.index].copy_(t)
        for name, t in copies:
            if not torch.equal(t.to(state[table[name].key].dtype), state[table[name].key].cpu()):
                log.warning("%s: %s differs from the main model's copy; MTP uses the shared one", path, name)
    return model


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def hf_config_json(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    if cfg.moe_layer_freq != 1:
        log.warning(
            "moe_layer_freq=%d: transformers' DeepseekV3 ignores it (MoE in every layer past the dense ones)",
            cfg.moe_layer_freq,
        )
    config = cfg.to_hf_dict()
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    return config


def save_hf(
    model: Transformer,
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
) -> None:
    """Write `model` as a HF DeepSeek-V3 checkpoint directory that transformers' from_pretrained reads."""
    state = model.state_dict()  # with bf16 weights: their float32 masters (dsv3.train.master_weights)
    dtype = parse_dtype(dtype) or state.get("lm_head.weight", model.lm_head.weight).dtype
    table = hf_tensor_table(model)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, spec in table.items():
            t = state[spec.key][spec.index]
            keep_fp32 = name.endswith("e_score_correction_bias")  # transformers keeps it float32 too
            yield name, t.float() if keep_fp32 else t.to(dtype)

    write_safetensors_dir(
        tensors(), Path(path), hf_config_json(model.config, dtype), parse_size(max_shard_size), overwrite
    )


# Files a HF model directory carries besides the weights; a conversion copies them along.
COMPANION_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def convert_hf(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> tuple[ModelConfig, int]:
    """Rewrite a HF DeepSeek-V3 checkpoint tensor by tensor (never the whole model in memory).

    Every tensor is checked against config.json, FP8 is dequantized, weights are cast to `dtype`
    (default: the config's), shards are cut at `max_shard_size`, the config is rewritten in the
    canonical spelling and the tokenizer/generation files are copied. Returns (config, tensors).
    """
    src = Path(src)
    cfg = _without_absent_mtp(src, read_hf_config(src))
    with torch.device("meta"):
        table = hf_tensor_table(Transformer(cfg))
    dtype = parse_dtype(dtype) or _config_dtype(cfg)
    written = 0

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        nonlocal written
        for name, t in read_hf_tensors(src, table):
            yield name, t.float() if name.endswith("e_score_correction_bias") else t.to(dtype)
            written += 1
            if on_tensor is not None:
                on_tensor(name)

    extras = {k: v for k, v in cfg.hf_extras.items() if k != "quantization_config"}  # now dequantized
    cfg = cfg.model_copy(update={"hf_extras": extras})
    companions = [src / name for name in COMPANION_FILES if (src / name).is_file()]
    write_safetensors_dir(
        tensors(), Path(dst), hf_config_json(cfg, dtype), parse_size(max_shard_size), overwrite, companions
    )
    return cfg, written
