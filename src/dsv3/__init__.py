"""dsv3: a PyTorch-native stack for DeepSeek-V3-style language models, raw text in, a trained model out."""

__version__ = "0.1.0"
