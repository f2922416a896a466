"""Serving-engine foundations: paged KV block bookkeeping with a hash-chain prefix cache (no tensors)."""

from kvstack.engine.blocks import (
    BlockManager,
    BlockPool,
    BlockStateError,
    CopyOnWrite,
    OutOfBlocksError,
    block_hash,
)

__all__ = ["BlockManager", "BlockPool", "BlockStateError", "CopyOnWrite", "OutOfBlocksError", "block_hash"]
