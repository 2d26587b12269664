"""SemShareKV: reuse the KV of earlier, semantically similar prompts (see reuse.py)."""

from moska.semshare.blend import BlendResult, blend_prefill, extend
from moska.semshare.config import SemShareConfig
from moska.semshare.lsh import LSHIndex
from moska.semshare.matching import TokenMatch, match_tokens, token_features
from moska.semshare.reuse import ReusePlan, SemanticReuse
from moska.semshare.rope_shift import rotate_by
from moska.semshare.store import Reference, ReferenceStore, prompt_key

__all__ = [
    "BlendResult",
    "LSHIndex",
    "Reference",
    "ReferenceStore",
    "ReusePlan",
    "SemShareConfig",
    "SemanticReuse",
    "TokenMatch",
    "blend_prefill",
    "extend",
    "match_tokens",
    "prompt_key",
    "rotate_by",
    "token_features",
]
