"""The unique (per-request) KV cache tensors, in pages of block_size tokens."""

from __future__ import annotations

import torch

from moska.kernels.kv_write import kv_write_ref


class PagedKVCache:
    """K and V [num_layers, blocks, block_size, Hkv, D]. ``num_layers`` counts the layers
    that own KV (``ModelConfig.num_kv_layers``): an MLKV model's sharing layers read their
    source layer's slot, so they take no memory here."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, blocks, bs, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.block_size = block_size

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    @staticmethod
    def bytes_per_block(num_layers, block_size, num_kv_heads, head_dim, dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    def write(
        self,
        layer: int,
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        slot_mapping: torch.Tensor,  # [T] int64
        write_fn=kv_write_ref,  # the attention ops' kv_write (one Triton launch on CUDA)
    ) -> None:
        assert k.shape == v.shape and k.shape[0] == slot_mapping.shape[0]
        kc = self.k[layer].view(-1, *self.k.shape[-2:])  # [blocks * bs, Hkv, D]
        vc = self.v[layer].view(-1, *self.v.shape[-2:])
        write_fn(k, v, kc, vc, slot_mapping)
