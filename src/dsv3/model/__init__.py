"""The DeepSeek-V3 model: MLA (attention.py), DeepSeekMoE (moe.py), RoPE/YaRN (rope.py), the decoder
and MTP (transformer.py), Hugging Face checkpoint interchange (hf.py)."""

from dsv3.model.transformer import ModelOutput, Transformer

__all__ = ["ModelOutput", "Transformer"]
