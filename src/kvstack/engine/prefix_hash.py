"""The prefix cache's keys: a full block of tokens hashed together with the hash of the block before it.

A block's hash therefore names its whole prefix (vLLM-style hash chain); ``docs/engine-design.md`` (section
"Blocks") explains the choice over a radix tree.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from kvstack.errors import KVStackError

__all__ = ["block_hash", "chain_hashes"]

_HASH_DOMAIN = b"kvstack.engine.block_hash.v1\x00"


def block_hash(parent: bytes | None, token_ids: Sequence[int], namespace: str = "") -> bytes:
    """Hash one full block of tokens chained to the hash of the block before it (vLLM-style hash chain).

    Parameters
    ----------
    parent : bytes or None
        Hash of the previous block of the same sequence, or None for the first block.
    token_ids : sequence of int
        The token ids of one *full* block (the caller guarantees its length is the block size).
    namespace : str, optional
        Key space, e.g. a model name: equal tokens under different namespaces never share a hash.

    Returns
    -------
    bytes
        A 32-byte SHA-256 digest identifying the whole prefix ending with this block.

    Raises
    ------
    KVStackError
        If ``token_ids`` is empty or a token id does not fit in a signed 64-bit integer.
    """
    tokens = list(token_ids)
    if not tokens:
        raise KVStackError("block_hash needs the token ids of a full block, got an empty sequence")
    parent_bytes = b"" if parent is None else bytes(parent)
    namespace_bytes = namespace.encode("utf-8")
    try:
        packed_tokens = struct.pack(f"<{len(tokens)}q", *tokens)
    except struct.error as exc:
        raise KVStackError(f"token ids must be integers in the signed 64-bit range, got {tokens!r}") from exc
    digest = hashlib.sha256(_HASH_DOMAIN)
    # Length prefixes keep the encoding unambiguous (no namespace/parent/tokens boundary can shift).
    digest.update(struct.pack("<Q", len(parent_bytes)))
    digest.update(parent_bytes)
    digest.update(struct.pack("<Q", len(namespace_bytes)))
    digest.update(namespace_bytes)
    digest.update(struct.pack("<Q", len(tokens)))
    digest.update(packed_tokens)
    return digest.digest()


def chain_hashes(tokens: Sequence[int], block_size: int, num_blocks: int, namespace: str = "") -> list[bytes]:
    """The hash chain of the first ``num_blocks`` full blocks of ``tokens`` (each hashed after its parent)."""
    parent: bytes | None = None
    hashes: list[bytes] = []
    for index in range(num_blocks):
        parent = block_hash(parent, tokens[index * block_size : (index + 1) * block_size], namespace)
        hashes.append(parent)
    return hashes
