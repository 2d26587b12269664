"""Typed errors raised while loading a model. Each message names the file and what is wrong."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """Base class: the model directory cannot be loaded as given."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names an architecture (or a feature of one) that moska does not run."""


class MissingFileError(ModelLoadError):
    """A file the loader needs (config.json, weights, tokenizer.json) is absent."""


class CorruptCheckpointError(ModelLoadError):
    """A file exists but its content is unreadable or does not match config.json."""
