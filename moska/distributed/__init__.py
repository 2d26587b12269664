"""moska on torch.distributed: tensor parallelism, shared-KV ranks and KV-parallel attention
(see docs/distributed.md)."""
