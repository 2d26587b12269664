"""HF-format Llama-family models: config, loader, decoder with delegated attention, tokenizer."""

from moska.model.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling, parse_dtype
from moska.model.errors import (
    CorruptCheckpointError,
    MissingFileError,
    ModelLoadError,
    UnsupportedArchitectureError,
)
from moska.model.llama import AttentionFn, CausalLM
from moska.model.loader import LoadedModel, load_model
from moska.model.reference import DenseAttention, greedy_generate
from moska.model.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AttentionFn",
    "CausalLM",
    "CorruptCheckpointError",
    "DenseAttention",
    "IncrementalDetokenizer",
    "LoadedModel",
    "MissingFileError",
    "ModelConfig",
    "ModelLoadError",
    "RopeScaling",
    "Tokenizer",
    "UnsupportedArchitectureError",
    "greedy_generate",
    "load_model",
    "parse_dtype",
]
