"""KV-cache bytes of a request, from a model's dims: what each reuse method (composed
libraries, SemShareKV) saves in memory is a count of tokens times this, so the benchmarks
state it from one formula rather than each its own.

Bytes per token = layers x 2 (K and V) x KV heads x head_dim x dtype bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVDims:
    """The dims that size a token's KV (one per model)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def of(cls, config, dtype_bytes: int) -> KVDims:
        """From a moska ModelConfig (``num_layers``, ``num_kv_heads``, ``head_dim``)."""
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, dtype_bytes)

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def bytes(self, tokens: int) -> int:
        """KV bytes of ``tokens`` tokens."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        return tokens * self.bytes_per_token


def composition_kv(
    dims: KVDims, context_tokens: int, request_tokens: int, library_tokens: int
) -> dict:
    """KV a request holds when its context comes from composed libraries vs when the same
    context (``context_tokens``, separators included) is encoded sequentially in front of it.
    Composed: the request holds only its own tokens' KV; the libraries' ``library_tokens``
    (their pools, chunk sinks included) are held once and shared by every request that reads
    them. Sequential: the request holds the context and its own tokens."""
    own = dims.bytes(request_tokens)
    seq = dims.bytes(context_tokens + request_tokens)
    return {
        "bytes_per_token": dims.bytes_per_token,
        "sequential_request_bytes": seq,
        "composed_request_bytes": own,
        "library_shared_bytes": dims.bytes(library_tokens),
        "request_bytes_saved": seq - own,
        "request_saved_pct": round(100 * (seq - own) / seq, 2) if seq else 0.0,
    }
