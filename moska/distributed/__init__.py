"""moska on torch.distributed: tensor parallelism, shared-KV ranks and KV-parallel attention
(see docs/distributed.md)."""

from moska.distributed.errors import RankFailedError, TensorParallelConfigError
from moska.distributed.tensor_parallel import ShardPlan

__all__ = ["RankFailedError", "ShardPlan", "TensorParallelConfigError"]
